// Preloaded into peers (NODE_OPTIONS=--require=<this file>) that have no host option:
// every TCP listen is forced onto 127.0.0.1, so no benchmark load ever leaves loopback.
"use strict";
const net = require("net");

const LOOPBACK = "127.0.0.1";
const original = net.Server.prototype.listen;

net.Server.prototype.listen = function listen(...args) {
  const first = args[0];
  if (first !== null && typeof first === "object" && !first._handle && !("fd" in first)) {
    // listen(options[, cb]); a Unix socket path (options.path) is left alone.
    if (!("path" in first)) args[0] = { ...first, host: LOOPBACK };
  } else if (typeof first === "number" || (typeof first === "string" && /^\d+$/.test(first))) {
    // listen(port[, host][, backlog][, cb])
    if (typeof args[1] === "string") args[1] = LOOPBACK;
    else args.splice(1, 0, LOOPBACK);
  } else if (first === undefined || typeof first === "function") {
    // listen([cb]): a random port on every interface by default.
    args.unshift(0, LOOPBACK);
  }
  return original.apply(this, args);
};
