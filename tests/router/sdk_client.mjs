// A real TypeScript SDK MCP client (@modelcontextprotocol/sdk, Streamable HTTP) that a Python test drives:
// one JSON command a line on stdin, one JSON answer a line on stdout.
//
//   node sdk_client.mjs URL [SESSION_ID]     (with a session id: join that session, no initialize, as the
//                                             SDK does to reconnect)
//
// Commands: {"op": "call", "name", "arguments"}, {"op": "subscribe" or "unsubscribe", "uri"}, {"op": "level", "level"},
// {"op": "session"}, {"op": "updates"} (the URIs of the resources/updated notifications seen so far),
// {"op": "terminate"} (DELETE the session), {"op": "close"}. Answers: {"ok": true, ...} or
// {"ok": false, "error": message, "code": the HTTP status or JSON-RPC code when there is one}.
import { createInterface } from "node:readline";

// The SDK `make install` put in deps/npm (an ES module resolves packages from its own folder only).
const sdk = (path) => import(new URL(`../../deps/npm/node_modules/@modelcontextprotocol/sdk/dist/esm/${path}`, import.meta.url));
const { Client } = await sdk("client/index.js");
const { StreamableHTTPClientTransport } = await sdk("client/streamableHttp.js");
const { ResourceUpdatedNotificationSchema } = await sdk("types.js");

const [url, sessionId] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), sessionId ? { sessionId } : {});
const client = new Client({ name: "pier-test-ts", version: "1.0.0" }, { capabilities: { roots: {} } });
const updates = [];
client.setNotificationHandler(ResourceUpdatedNotificationSchema, (n) => updates.push(n.params.uri));

async function run(command) {
  switch (command.op) {
    case "call": {
      const result = await client.callTool({ name: command.name, arguments: command.arguments ?? {} });
      return { text: result.content?.[0]?.text, isError: result.isError ?? false };
    }
    case "subscribe":
      await client.subscribeResource({ uri: command.uri });
      return {};
    case "unsubscribe":
      await client.unsubscribeResource({ uri: command.uri });
      return {};
    case "level":
      await client.setLoggingLevel(command.level);
      return {};
    case "session":
      return { session: transport.sessionId };
    case "updates":
      return { updates };
    case "terminate":
      await transport.terminateSession();
      return {};
    case "close":
      await client.close();
      return {};
    default:
      throw new Error(`unknown op ${command.op}`);
  }
}

function reply(answer) {
  process.stdout.write(JSON.stringify(answer) + "\n");
}

try {
  await client.connect(transport);
  reply({ ok: true, session: transport.sessionId });
} catch (error) {
  reply({ ok: false, error: String(error?.message ?? error), code: error?.code });
  process.exit(1);
}
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  try {
    reply({ ok: true, ...(await run(command)) });
  } catch (error) {
    reply({ ok: false, error: String(error?.message ?? error), code: error?.code });
  }
  if (command.op === "close") break;
}
process.exit(0);
