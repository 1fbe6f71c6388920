// The official JavaScript SDK (@fly/sprites 0.1.0) in control mode: its
// execs go over the multiplexed control connection (GET .../control).
// Two commands at once, then more over the same pooled connections.
// Driven by tests/sdk.rs, which also checks that no exec fell back to the
// plain exec WebSocket (the SDK falls back silently on any error).
import { check, sprite as connect } from './js_common.mjs';

const sprite = connect({ controlMode: true });

const [a, b] = await Promise.all([
  sprite.execFile('sh', ['-c', 'echo a; echo a-err >&2']),
  sprite.execFile('sh', ['-c', 'echo b']),
]);
check(a.stdout === 'a\n' && a.stderr === 'a-err\n', `first of two at once: ${JSON.stringify(a)}`);
check(b.stdout === 'b\n', `second of two at once: ${JSON.stringify(b)}`);
for (let i = 0; i < 3; i++) {
  const r = await sprite.execFile('sh', ['-c', 'echo "$X $PWD"'], { env: { X: `run${i}`, PATH: '/usr/bin:/bin' }, cwd: '/tmp' });
  check(r.stdout === `run${i} /tmp\n`, `reused connection, env and cwd: ${JSON.stringify(r)}`);
}
console.log('JS control: all passed');
process.exit(0);
