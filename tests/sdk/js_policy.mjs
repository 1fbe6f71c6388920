// The official @fly/sprites SDK's network policy calls against a real
// sprited whose environment has its own network (`--network own`): none at
// first; an update is in force and read back; an invalid rule is named and
// leaves the policy in force alone; an empty policy lifts it. Driven by
// tests/sdk.rs (the enforcement itself: tests/network.rs).
import { check, sprite as connect } from './js_common.mjs';

const sprite = connect();
const none = await sprite.getNetworkPolicy();
check(JSON.stringify(none) === '{"rules":[]}', `getNetworkPolicy: ${JSON.stringify(none)}`);
const rules = [{ action: 'allow', domain: '*.example.org' }, { action: 'deny', domain: '*' }];
await sprite.updateNetworkPolicy({ rules });
const got = await sprite.getNetworkPolicy();
check(JSON.stringify(got.rules) === JSON.stringify(rules), `the update is in force: ${JSON.stringify(got)}`);
let refused = null;
try {
  await sprite.updateNetworkPolicy({ rules: [{ action: 'allow', domain: 'not a domain' }] });
} catch (e) {
  refused = e.message;
}
check(refused && refused.includes('rules[0].domain'), `an invalid rule is named: ${refused}`);
const still = await sprite.getNetworkPolicy();
check(still.rules.length === 2, `the policy in force stays: ${JSON.stringify(still)}`);
await sprite.updateNetworkPolicy({ rules: [] });
const lifted = await sprite.getNetworkPolicy();
check(lifted.rules.length === 0, `an empty policy lifts it: ${JSON.stringify(lifted)}`);
console.log('JS SDK policy: all passed');
