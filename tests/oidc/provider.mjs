// A real OpenID provider for the tests: panva's oidc-provider (OpenID Certified), configured as a
// company's identity provider for an MCP server would be: authorization code + PKCE, dynamic client
// registration, RFC 8707 resource indicators with JWT access tokens whose audience is the resource,
// RS256 keys the test hands it (so it can rotate them), and its development login screen (any user
// name signs in; the tests drive the form over HTTP, or a real browser does).
//
// The same script plays the third-party provider users connect their accounts at (a second instance):
// static clients with secrets (CLIENTS), refresh tokens for clients allowed the grant, revocation
// (RFC 7009), and access tokens as short-lived as a test needs (ACCESS_TTL). oidc-provider has no token
// exchange (RFC 8693): the grant is registered here, as a provider that offers it would implement it —
// the subject token verified as one of this provider's own, a new token minted for the audience asked.
//
// For the tests only: GET /test/stats counts successful grants by type and revocations; POST
// /test/fault?mode=garbage|hang|off makes the token endpoint answer garbage or nothing (a provider that
// breaks), while the rest of the provider works.
//
//   NODE_MODULES=deps/npm/node_modules PORT=4000 KEYS=/path/jwks.json [ACCESS_TTL=600] [EXCHANGE_TTL=300]
//   [CLIENTS=/path/clients.json] node provider.mjs
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

// Installed with the project's other npm packages (deps/npm), not beside this file.
const load = (name, ...path) => import(pathToFileURL(join(process.env.NODE_MODULES, name, ...path)).href);
const { default: Provider, errors } = await load('oidc-provider', 'lib', 'index.js');
const jose = await load('jose', 'dist', 'webapi', 'index.js');

const port = Number(process.env.PORT);
const issuer = process.env.ISSUER || `http://127.0.0.1:${port}`;
const jwks = JSON.parse(readFileSync(process.env.KEYS, 'utf8'));
const clients = process.env.CLIENTS ? JSON.parse(readFileSync(process.env.CLIENTS, 'utf8')) : [];
const accessTtl = Number(process.env.ACCESS_TTL || 600);
const exchangeTtl = Number(process.env.EXCHANGE_TTL || 300);
const EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';

const groupsOf = (user) => (user.startsWith('admin') ? ['admins'] : ['staff']);
const stats = { grants: {}, revocations: 0, grants_revoked: 0 };
let fault = 'off';

const provider = new Provider(issuer, {
  jwks,
  clients,
  features: {
    devInteractions: { enabled: true },
    registration: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => undefined,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator) => ({
        scope: 'mcp',
        audience: resourceIndicator,
        accessTokenTTL: accessTtl,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  scopes: ['openid', 'offline_access', 'mcp'],
  pkce: { required: () => true },
  ttl: { AccessToken: accessTtl },
  // Refresh tokens for every client allowed the grant (the connected accounts' provider); the others
  // (the identity tests' MCP clients) are not.
  issueRefreshToken: (ctx, client) => client.grantTypeAllowed('refresh_token'),
  // The user's groups in their ID token too (the portal reads them there).
  conformIdTokenClaims: false,
  clientDefaults: { token_endpoint_auth_method: 'none', grant_types: ['authorization_code'], response_types: ['code'] },
  // The user's groups travel in their access tokens too (Pier's tool rules may name groups).
  extraTokenClaims: (ctx, token) => (token.accountId ? { groups: groupsOf(token.accountId) } : undefined),
  findAccount: (ctx, id) => ({ accountId: id, claims: () => ({ sub: id, groups: groupsOf(id) }) }),
  claims: { openid: ['sub'], mcp: ['groups'] },
});
provider.proxy = false;

// RFC 8693: the subject token is one of this provider's own (signature, issuer, time); the token issued
// is for the audience asked, the same user, the scope asked, acting for the client that asked.
const publicKeys = jose.createLocalJWKSet({ keys: jwks.keys.map(({ d, p, q, dp, dq, qi, key_ops: _ops, ...pub }) => pub) });
const signingKey = await jose.importJWK(jwks.keys[0], 'RS256');
provider.registerGrantType(EXCHANGE, async (ctx) => {
  const { subject_token: subject, subject_token_type: type, audience, scope } = ctx.oidc.params;
  if (!subject || type !== ACCESS_TOKEN_TYPE) throw new errors.InvalidRequest('an access token is exchanged here');
  if (!audience) throw new errors.InvalidTarget('name the audience');
  let claims;
  try {
    ({ payload: claims } = await jose.jwtVerify(subject, publicKeys, { issuer }));
  } catch {
    throw new errors.InvalidGrant('the subject token is not valid');
  }
  const now = Math.floor(Date.now() / 1000);
  const token = await new jose.SignJWT({ sub: claims.sub, scope, client_id: ctx.oidc.client.clientId, act: { sub: ctx.oidc.client.clientId } })
    .setProtectedHeader({ alg: 'RS256', kid: jwks.keys[0].kid, typ: 'at+jwt' })
    .setIssuer(issuer).setAudience(audience).setIssuedAt(now).setExpirationTime(now + exchangeTtl).setJti(randomUUID())
    .sign(signingKey);
  ctx.body = { access_token: token, issued_token_type: ACCESS_TOKEN_TYPE, token_type: 'Bearer', expires_in: exchangeTtl, scope };
}, ['subject_token', 'subject_token_type', 'audience', 'scope', 'requested_token_type', 'resource']);

provider.on('grant.success', (ctx) => {
  const type = ctx.oidc.params.grant_type;
  stats.grants[type] = (stats.grants[type] || 0) + 1;
});
provider.on('grant.revoked', () => { stats.grants_revoked += 1; });

provider.use(async (ctx, next) => {
  if (ctx.path === '/test/stats') {
    ctx.body = stats;
    return;
  }
  if (ctx.path === '/test/fault' && ctx.method === 'POST') {
    fault = ctx.query.mode || 'off';
    ctx.body = { fault };
    return;
  }
  if (ctx.path === '/token/revocation') stats.revocations += 1;
  if (ctx.path === '/token' && fault === 'garbage') {
    ctx.status = 200;
    ctx.type = 'text/html';
    ctx.body = '<html><body>Service temporarily unavailable</body></html>';
    return;
  }
  if (ctx.path === '/token' && fault === 'hang') {
    await new Promise((resolve) => { setTimeout(resolve, 120_000); });
    return;
  }
  await next();
});

provider.listen(port, '127.0.0.1', () => console.log(`oidc provider ${issuer} listening`));
process.on('SIGTERM', () => process.exit(0));
