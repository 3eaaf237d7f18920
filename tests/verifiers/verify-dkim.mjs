// Verifies every DKIM-Signature of the message on standard input with mailauth (a Node.js
// implementation independent of dkimpy), looking public keys up in the DNS server given as
// HOST PORT (the tests' NSD). Prints one line per signature:
// domain<TAB>selector<TAB>algorithm<TAB>result<TAB>comment
import { createRequire } from 'node:module';
import { Resolver } from 'node:dns/promises';

const require = createRequire(import.meta.url);
const { dkimVerify } = require('mailauth/lib/dkim/verify');

const [host, port] = process.argv.slice(2);
const dns = new Resolver({ timeout: 5000, tries: 2 });
dns.setServers([`${host}:${port}`]);

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const result = await dkimVerify(Buffer.concat(chunks), {
    resolver: (name, type) => dns.resolve(name, type)
});
for (const signature of result.results) {
    const status = signature.status || {};
    console.log(
        [signature.signingDomain, signature.selector, signature.algo, status.result, status.comment || '']
            .map(value => String(value ?? ''))
            .join('\t')
    );
}
