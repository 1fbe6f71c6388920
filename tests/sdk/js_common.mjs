// What the JavaScript SDK scripts share: a client for the daemon that
// tests/sdk.rs started (URL, token and name in the environment) and a
// `check` that fails the script with a message.
import { SpritesClient } from '@fly/sprites';

export function sprite(options = {}) {
  const client = new SpritesClient(process.env.SPRITED_TOKEN, { baseURL: process.env.SPRITED_URL, ...options });
  return client.sprite(process.env.SPRITED_NAME);
}

export function check(cond, what) {
  if (!cond) {
    console.error(`FAIL: ${what}`);
    process.exit(1);
  }
  console.log(`ok: ${what}`);
}
