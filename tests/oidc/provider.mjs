// A real OpenID provider for the tests: panva's oidc-provider (OpenID Certified), configured as a
// company's identity provider for an MCP server would be: authorization code + PKCE, dynamic client
// registration, RFC 8707 resource indicators with JWT access tokens whose audience is the resource,
// RS256 keys the test hands it (so it can rotate them), and its development login screen (any user
// name signs in; the tests drive the form over HTTP).
//
//   NODE_MODULES=deps/npm/node_modules PORT=4000 KEYS=/path/jwks.json [ACCESS_TTL=600] node provider.mjs
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

// Installed with the project's other npm packages (deps/npm), not beside this file.
const { default: Provider } = await import(pathToFileURL(join(process.env.NODE_MODULES, 'oidc-provider', 'lib', 'index.js')).href);

const port = Number(process.env.PORT);
const issuer = process.env.ISSUER || `http://127.0.0.1:${port}`;
const jwks = JSON.parse(readFileSync(process.env.KEYS, 'utf8'));
const accessTtl = Number(process.env.ACCESS_TTL || 600);

const groupsOf = (user) => (user.startsWith('admin') ? ['admins'] : ['staff']);

const provider = new Provider(issuer, {
  jwks,
  features: {
    devInteractions: { enabled: true },
    registration: { enabled: true },
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
  clientDefaults: { token_endpoint_auth_method: 'none', grant_types: ['authorization_code'], response_types: ['code'] },
  // The user's groups travel in their access tokens too (Pier's tool rules may name groups).
  extraTokenClaims: (ctx, token) => (token.accountId ? { groups: groupsOf(token.accountId) } : undefined),
  findAccount: (ctx, id) => ({ accountId: id, claims: () => ({ sub: id, groups: groupsOf(id) }) }),
  claims: { openid: ['sub'], mcp: ['groups'] },
});
provider.proxy = false;
provider.listen(port, '127.0.0.1', () => console.log(`oidc provider ${issuer} listening`));
process.on('SIGTERM', () => process.exit(0));
