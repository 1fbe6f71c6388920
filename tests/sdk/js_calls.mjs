// The rest of @fly/sprites' per-sprite calls, each driven through the
// SDK's own code against a real sprited: files (copy, rename, chmod, stat,
// exists, rm), services (create, list, get, logs, signal,
// restart, stop, delete), port events and the TCP proxy, sessions (create,
// list, attach, kill), getCheckpoint and the resources policy. Driven by
// tests/sdk.rs; js_sdk.mjs and js_control.mjs cover the others. Not here:
// execFileHTTP, which needs the HTTP chunk boundaries of its frames kept,
// and Node's fetch joins chunks that arrive together (the SDK's README
// says the protocol cannot promise them); tests/exec.rs covers that route.
import net from 'node:net';
import { check, sprite as connect } from './js_common.mjs';

const sprite = connect();
const all = async (stream) => {
  const out = [];
  await stream.processAll((e) => out.push(e));
  return out;
};

// Files.
const fs = sprite.filesystem('/');
await fs.writeFile('/srv/a.txt', 'alpha');
await fs.copyFile('/srv/a.txt', '/srv/b.txt');
await fs.rename('/srv/b.txt', '/srv/c.txt');
await fs.chmod('/srv/c.txt', 0o600);
const st = await fs.stat('/srv/c.txt');
check(st.size === 5, `stat: ${JSON.stringify(st)}`);
check((await fs.exists('/srv/c.txt')) && !(await fs.exists('/srv/b.txt')), 'copyFile, rename, exists');
check((await fs.readFile('/srv/c.txt', 'utf8')) === 'alpha', 'the copy holds the content');
const { stdout: mode } = await sprite.execFile('stat', ['-c', '%a', '/srv/c.txt']);
check(mode === '600\n', `chmod: ${JSON.stringify(mode)}`);
await fs.rm('/srv', { recursive: true });
check(!(await fs.exists('/srv/a.txt')), 'rm recursive');

// Services, their ports and the proxy.
const created = await all(
  await sprite.createService('web', { cmd: 'python3', args: ['-m', 'http.server', '8123', '--bind', '127.0.0.1'], httpPort: 8123 }, '0s'),
);
check(created.some((e) => e.type === 'started'), `createService: ${JSON.stringify(created)}`);
check((await sprite.listServices()).map((s) => s.name).includes('web'), 'listServices');
check((await sprite.getService('web')).state.status === 'running', 'getService');
const ports = await sprite.watchPorts();
let listening = false;
for (let ev = await ports.next(); ev !== null && !listening; ev = await ports.next()) {
  const list = ev.type === 'port_list' ? ev.ports : [ev];
  listening = list.some((p) => p.type === 'port_opened' && p.port === 8123);
}
ports.close();
check(listening, 'watchPorts reports the service listening on 8123');
const local = await new Promise((resolve) => {
  const srv = net.createServer();
  srv.listen(0, '127.0.0.1', () => {
    const { port } = srv.address();
    srv.close(() => resolve(port));
  });
});
const proxy = await sprite.proxyPort(local, 8123);
const page = await fetch(`http://127.0.0.1:${local}/`);
check(page.status === 200, `proxyPort: GET / through the tunnel is ${page.status}`);
await page.text();
proxy.close();
const logs = await all(await sprite.getServiceLogs('web', { lines: 50 }));
check(logs.some((e) => e.type === 'stderr' && /GET \//.test(e.data)), `getServiceLogs shows the request: ${JSON.stringify(logs)}`);
await sprite.signalService('web', 'CONT');
const restarted = await all(await sprite.restartService('web', '0s'));
check(restarted.some((e) => e.type === 'started'), `restartService: ${JSON.stringify(restarted)}`);
const stopped = await all(await sprite.stopService('web'));
check(stopped.some((e) => e.type === 'stopped' || e.type === 'exit'), `stopService: ${JSON.stringify(stopped)}`);
await sprite.deleteService('web');
check(!(await sprite.listServices()).map((s) => s.name).includes('web'), 'deleteService');

// Sessions: create, list, attach, kill.
const session = sprite.createSession('sleep', ['300']);
const info = await new Promise((resolve) => session.on('message', (m) => m && m.type === 'session_info' && resolve(m)));
const id = String(info.session_id ?? info.id);
const listed = await sprite.listSessions();
check(listed.some((s) => s.id === id && s.command.includes('sleep')), `listSessions: ${JSON.stringify(listed)}`);
const attached = sprite.attachSession(id);
const attachedInfo = await new Promise((resolve) => attached.on('message', (m) => m && m.type === 'session_info' && resolve(m)));
check(String(attachedInfo.session_id ?? attachedInfo.id) === id, `attachSession: ${JSON.stringify(attachedInfo)}`);
const exited = new Promise((resolve) => attached.on('exit', resolve));
const killed = await all(await sprite.killSession(id, 'SIGTERM', '5s'));
check(killed.length > 0 && killed[killed.length - 1].type === 'complete', `killSession: ${JSON.stringify(killed)}`);
await exited;

// A checkpoint by id.
await all(await sprite.createCheckpoint('calls'));
const cp = await sprite.getCheckpoint('v1');
check(cp.id === 'v1' && cp.comment === 'calls', `getCheckpoint: ${JSON.stringify(cp)}`);

// The resources policy: enforced where the memory controller is offered,
// refused (503, nothing stored) where it is not.
let refused = null;
try {
  await sprite.updateResourcesPolicy({ memory: { limitMB: 512 } });
} catch (e) {
  refused = e.message;
}
if (refused === null) {
  const res = await sprite.getResourcesPolicy();
  check(res.memory && res.memory.limitMB === 512, `updateResourcesPolicy: ${JSON.stringify(res)}`);
  await sprite.deleteResourcesPolicy();
} else {
  check(/memory controller/.test(refused), `updateResourcesPolicy refused with the reason: ${refused}`);
}
check((await sprite.getResourcesPolicy()).memory === undefined, 'no limit in the end');
console.log('JS calls: all passed');
process.exit(0);
