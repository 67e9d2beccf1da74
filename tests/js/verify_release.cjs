// Verifies an edgefl release manifest without Python: RFC 8785 canonical JSON
// (the npm `canonicalize` package) and Ed25519 (node:crypto).
// stdin: {"manifest": "<the manifest JSON as published>", "public_key": "<base64 raw key>"}
// Prints "valid" and exits 0, or prints "invalid" and exits 1.
'use strict';
const crypto = require('node:crypto');
const path = require('node:path');
const canonicalize = require(path.join(process.env.JCS_DIR, 'node_modules', 'canonicalize'));

let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const request = JSON.parse(input);
  const manifest = JSON.parse(request.manifest);
  const signature = Buffer.from(manifest.signature, 'base64');
  delete manifest.signature;
  const signed = Buffer.from(canonicalize(manifest), 'utf8');
  const raw = Buffer.from(request.public_key, 'base64');
  const key = crypto.createPublicKey({
    key: { kty: 'OKP', crv: 'Ed25519', x: raw.toString('base64url') }, format: 'jwk',
  });
  const ok = crypto.verify(null, signed, key, signature);
  process.stdout.write(ok ? 'valid\n' : 'invalid\n');
  process.exit(ok ? 0 : 1);
});
