// The official JavaScript SDK (@fly/sprites 0.1.0) against a real sprited:
// the filesystem at the environment's absolute paths, exec seeing what the
// filesystem API wrote, a checkpoint / overwrite / restore round trip,
// chown, the privileges policy and fs.watch. Driven by tests/sdk.rs (Node 20 needs --experimental-websocket).
import { check, sprite as connect } from './js_common.mjs';

const sprite = connect();

const fs = sprite.filesystem('/');
await fs.writeFile('/app/hello.txt', 'hello from js');
const { stdout } = await sprite.execFile('cat', ['/app/hello.txt']);
check(stdout === 'hello from js', `exec cat /app/hello.txt: ${JSON.stringify(stdout)}`);
const names = await fs.readdir('/app');
check(JSON.stringify(names) === JSON.stringify(['hello.txt']), `readdir /app: ${names}`);
const rel = sprite.filesystem('/app');
check((await rel.readFile('hello.txt', 'utf8')) === 'hello from js', 'a path relative to workingDir');

const created = [];
await (await sprite.createCheckpoint('from js')).processAll((m) => created.push(m));
const last = created[created.length - 1];
check(last && last.type === 'complete', `createCheckpoint streams to complete: ${JSON.stringify(last)}`);
const ids = (await sprite.listCheckpoints()).map((c) => c.id);
check(ids.includes('v1'), `listCheckpoints: ${ids}`);

await fs.writeFile('/app/hello.txt', 'overwritten');
check((await fs.readFile('/app/hello.txt', 'utf8')) === 'overwritten', 'overwritten');
const restored = [];
await (await sprite.restoreCheckpoint('v1')).processAll((m) => restored.push(m));
const end = restored[restored.length - 1];
check(end && end.type === 'complete', `restoreCheckpoint streams to complete: ${JSON.stringify(end)}`);
check((await fs.readFile('/app/hello.txt', 'utf8')) === 'hello from js', 'the original content is back');

// chown: by the environment's names (recursive) and by number.
await fs.writeFile('/app/owned/sub/a.txt', 'a');
await fs.chown('/app/owned', { uid: 'nobody', gid: 'nogroup', recursive: true });
const { stdout: owners } = await sprite.execFile('stat', ['-c', '%u:%g %n', '/app/owned', '/app/owned/sub', '/app/owned/sub/a.txt']);
check(
  owners === '65534:65534 /app/owned\n65534:65534 /app/owned/sub\n65534:65534 /app/owned/sub/a.txt\n',
  `chown -R nobody:nogroup: ${JSON.stringify(owners)}`,
);
await fs.chown('/app/hello.txt', { uid: 1234 });
const { stdout: one } = await sprite.execFile('stat', ['-c', '%u:%g', '/app/hello.txt']);
check(one === '1234:0\n', `chown uid only: ${JSON.stringify(one)}`);
let refused = null;
try {
  await fs.chown('/app/hello.txt', { gid: 'no-such-group' });
} catch (e) {
  refused = e;
}
check(refused && /gid/.test(refused.message), `an unknown group is refused: ${refused && refused.message}`);

// The privileges policy: set, read, in force for the next command, removed.
const capBnd = async () => (await sprite.execFile('grep', ['CapBnd', '/proc/self/status'])).stdout.trim();
const defaultCaps = await capBnd();
await sprite.updatePrivilegesPolicy({ profile: 'minimal', noNewPrivileges: true });
const pol = await sprite.getPrivilegesPolicy();
check(pol.profile === 'minimal' && pol.noNewPrivileges === true, `getPrivilegesPolicy: ${JSON.stringify(pol)}`);
check((await capBnd()).endsWith('00000000000000fb'), `minimal profile in force: ${await capBnd()}`);
await sprite.deletePrivilegesPolicy();
check((await capBnd()) === defaultCaps, `deletePrivilegesPolicy restores ${defaultCaps}`);

// fs.watch: subscribed, then a write's events.
const watcher = await fs.watch('/app', { recursive: true });
const subscribed = await watcher.next();
check(subscribed && subscribed.type === 'subscribed', `watch subscribed: ${JSON.stringify(subscribed)}`);
await fs.writeFile('/app/owned/sub/watched.txt', 'w');
let seen = null;
for (let ev = await watcher.next(); ev !== null; ev = await watcher.next()) {
  if (ev.type === 'event' && ev.path === '/app/owned/sub/watched.txt') {
    seen = ev;
    break;
  }
}
watcher.close();
check(seen && ['create', 'write'].includes(seen.event) && seen.isDir === false, `watch saw the write: ${JSON.stringify(seen)}`);

// The network policy: none in force; an invalid one named (setting one:
// js_policy.mjs).
const net = await sprite.getNetworkPolicy();
check(JSON.stringify(net) === '{"rules":[]}', `getNetworkPolicy: ${JSON.stringify(net)}`);
const refusal = async (policy) => {
  try {
    await sprite.updateNetworkPolicy(policy);
    return null;
  } catch (e) {
    return e.message;
  }
};
const invalid = await refusal({ rules: [{ action: 'sometimes', domain: 'github.com' }] });
check(invalid && invalid.startsWith('Invalid policy') && invalid.includes('rules[0].action'), `an invalid policy: ${invalid}`);
const res = await sprite.getResourcesPolicy();
check(res.memory === undefined, `getResourcesPolicy without a limit: ${JSON.stringify(res)}`);
console.log('JS SDK: all passed');
