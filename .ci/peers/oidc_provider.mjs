// A real OAuth 2.0 / OIDC issuer for jwtplus's interop tests: panva's oidc-provider, client_credentials grant,
// RFC 9068 JWT access tokens for one resource indicator.
//   node .ci/peers/oidc_provider.mjs --port PORT --keys FILE [--resource URL] [--alg RS256|PS256|ES256|EdDSA]
// FILE is {"keys": [private JWKs]}; the first key whose "alg" is --alg signs, every key is published at jwks_uri.
// Prints "ready http://127.0.0.1:PORT" on stdout once listening; everything else goes to stderr.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import Provider, { errors } from 'oidc-provider';

// oidc-provider prints its NOTICEs with console.info (stdout); keep stdout for the ready line alone.
console.info = console.error;

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    keys: { type: 'string' },
    resource: { type: 'string', default: 'https://api.jwtplus.test' },
    alg: { type: 'string', default: 'RS256' },
  },
});
if (!args.port || !args.keys) {
  console.error('usage: oidc_provider.mjs --port PORT --keys FILE [--resource URL] [--alg ALG]');
  process.exit(2);
}

// key_ops would be published as is, and PyJWT exports RSA private keys with key_ops ["sign"], which
// verifiers such as jose then refuse to verify with; the published keys carry none.
const keys = JSON.parse(readFileSync(args.keys, 'utf8')).keys.map(({ key_ops: _, ...jwk }) => jwk);
if (!keys.some((jwk) => jwk.alg === args.alg)) {
  // oidc-provider would start anyway and answer every token request with a 500
  console.error(`no key in ${args.keys} has "alg": "${args.alg}"`);
  process.exit(2);
}
const issuer = `http://127.0.0.1:${args.port}`;
const provider = new Provider(issuer, {
  clients: [{
    client_id: 'resource-test',
    client_secret: 'resource-test-secret-0123456789abcdef',
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    id_token_signed_response_alg: args.alg,  // the default, RS256, needs an RS256 key even with none to sign
  }],
  jwks: { keys },
  cookies: { keys: ['jwtplus-test-cookie-key-0', 'jwtplus-test-cookie-key-1'] },
  ttl: { ClientCredentials: 300 },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      getResourceServerInfo(ctx, resourceIndicator) {
        if (resourceIndicator !== args.resource) throw new errors.InvalidTarget();
        return {
          scope: 'api:read api:write',
          audience: args.resource,
          accessTokenTTL: 300,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: args.alg } },
        };
      },
    },
  },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

const server = provider.listen(Number(args.port), '127.0.0.1', () => {
  process.stdout.write(`ready ${issuer}\n`);
});
server.on('error', (err) => {
  console.error(err);
  process.exit(1);
});
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
});
