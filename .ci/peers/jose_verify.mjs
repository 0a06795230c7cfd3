// A second, independent JWT verifier for jwtplus's interop tests: jose's createRemoteJWKSet + jwtVerify.
//   node .ci/peers/jose_verify.mjs --jwks-url URL --algorithms EdDSA,ES256 [--issuer ISS] [--audience AUD]
//                                  [--cooldown-ms MS] [--cache-max-age-ms MS]
// Prints "ready", then answers each token line on stdin with one JSON line on stdout, in order:
//   {"ok": true, "kid": ..., "payload": {...}}  or  {"ok": false, "code": "ERR_JWT_EXPIRED"}
// Without --cooldown-ms / --cache-max-age-ms jose's own defaults apply (30000 / 600000).
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { createRemoteJWKSet, jwtVerify } from 'jose';

const { values: args } = parseArgs({
  options: {
    'jwks-url': { type: 'string' },
    issuer: { type: 'string' },
    audience: { type: 'string' },
    algorithms: { type: 'string' },
    'cooldown-ms': { type: 'string' },
    'cache-max-age-ms': { type: 'string' },
  },
});
if (!args['jwks-url'] || !args.algorithms) {
  console.error('usage: jose_verify.mjs --jwks-url URL --algorithms ALG[,ALG] [--issuer ISS] [--audience AUD] '
    + '[--cooldown-ms MS] [--cache-max-age-ms MS]');
  process.exit(2);
}

const jwks = createRemoteJWKSet(new URL(args['jwks-url']), {
  ...(args['cooldown-ms'] !== undefined && { cooldownDuration: Number(args['cooldown-ms']) }),
  ...(args['cache-max-age-ms'] !== undefined && { cacheMaxAge: Number(args['cache-max-age-ms']) }),
});
const options = {
  algorithms: args.algorithms.split(','),
  ...(args.issuer !== undefined && { issuer: args.issuer }),
  ...(args.audience !== undefined && { audience: args.audience }),
};

async function verify(token) {
  try {
    const { payload, protectedHeader } = await jwtVerify(token, jwks, options);
    return { ok: true, kid: protectedHeader.kid, payload };
  } catch (err) {
    return { ok: false, code: err.code || err.name };
  }
}

// Writes to a pipe are synchronous on Linux, so each answer is out before the next line is read.
process.stdout.write('ready\n');
for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  process.stdout.write(`${JSON.stringify(await verify(line.trim()))}\n`);
}
process.exit(0);
