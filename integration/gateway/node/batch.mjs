// The Batch API through the official OpenAI Node client, unchanged but for
// its base URL and key. Prints one JSON line per scenario: {"name", "ok",
// ...details}; the Go test (integration/gateway, TestBatchOpenAINodeClient)
// checks them. Environment: BASE_URL, API_KEY, OTHER_KEY (a second key),
// INPUT (a JSONL file of chat requests), CANCEL_INPUT (a larger one, to
// cancel).
import fs from 'node:fs';
import OpenAI from 'openai';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const baseURL = env('BASE_URL');
const client = new OpenAI({ baseURL, apiKey: env('API_KEY'), maxRetries: 0, timeout: 120_000 });
const other = new OpenAI({ baseURL, apiKey: env('OTHER_KEY'), maxRetries: 0, timeout: 120_000 });

const report = (name, ok, details = {}) => console.log(JSON.stringify({ name, ok, ...details }));
const errInfo = (e) => ({ error: e?.constructor?.name, status: e?.status, code: e?.code ?? e?.error?.code, message: String(e?.message).slice(0, 300) });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function scenario(name, fn) {
  try {
    await fn();
  } catch (e) {
    report(name, false, errInfo(e));
  }
}

const terminal = new Set(['completed', 'failed', 'expired', 'cancelled']);
async function until(id, done = (b) => terminal.has(b.status)) {
  const deadline = Date.now() + 240_000;
  for (;;) {
    const b = await client.batches.retrieve(id);
    if (done(b) || Date.now() > deadline) return b;
    await sleep(200);
  }
}

let batch;
await scenario('run', async () => {
  const file = await client.files.create({ file: fs.createReadStream(env('INPUT')), purpose: 'batch' });
  batch = await client.batches.create({
    input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h', metadata: { job: 'it' },
  });
  const created = batch.status;
  batch = await until(batch.id);
  const out = await client.files.content(batch.output_file_id);
  const text = await out.text();
  const lines = text.trim().split('\n').map((l) => JSON.parse(l));
  const answers = Object.fromEntries(lines.map((l) => [l.custom_id, l.response?.body?.choices?.[0]?.message?.content]));
  report('run', batch.status === 'completed' && file.purpose === 'batch' && created === 'validating' && batch.metadata?.job === 'it' &&
    lines.every((l) => l.response?.status_code === 200 && l.error === null && l.response.body.object === 'chat.completion'),
  { file: file.id, batch: batch.id, status: batch.status, counts: batch.request_counts, lines: lines.length, answers, custom_ids: lines.map((l) => l.custom_id) });
});

await scenario('other_key', async () => {
  let status = 0;
  try {
    await other.batches.retrieve(batch.id);
  } catch (e) {
    status = e.status;
  }
  let fileStatus = 0;
  try {
    await other.files.content(batch.output_file_id);
  } catch (e) {
    fileStatus = e.status;
  }
  const list = await other.batches.list();
  report('other_key', status === 404 && fileStatus === 404 && list.data.length === 0, { status, fileStatus, listed: list.data.length });
});

await scenario('cancel', async () => {
  const file = await client.files.create({ file: fs.createReadStream(env('CANCEL_INPUT')), purpose: 'batch' });
  let b = await client.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  b = await until(b.id, (x) => x.status !== 'validating');
  const cancelling = await client.batches.cancel(b.id);
  b = await until(b.id);
  const c = b.request_counts;
  report('cancel', ['cancelling', 'cancelled'].includes(cancelling.status) && b.status === 'cancelled' && c.total > 0 &&
    c.completed + c.failed === c.total && c.completed < c.total, { status: b.status, counts: c });
});

await scenario('list', async () => {
  // Auto-pagination, one batch a page: every batch of this key, newest first.
  const ids = [];
  for await (const b of client.batches.list({ limit: 1 })) ids.push(b.id);
  const files = await client.files.list();
  report('list', ids.length === 2 && ids[1] === batch.id && files.data.length >= 2, { ids, files: files.data.length });
});
