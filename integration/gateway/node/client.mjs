// Drives the sous gateway with the official OpenAI Node client and prints one
// JSON line per scenario: {"name", "ok", ...details}. The Go test
// (integration/gateway) starts the gateway, the worker and Ollama, runs this
// script and checks every line. Environment: BASE_URL, FULL_BASE_URL (a
// gateway whose queue is full), API_KEY, MODEL, ENDLESS_MODEL.
import OpenAI from 'openai';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const baseURL = env('BASE_URL');
const model = env('MODEL');
const client = new OpenAI({ baseURL, apiKey: env('API_KEY'), maxRetries: 0, timeout: 120_000 });

const report = (name, ok, details = {}) => console.log(JSON.stringify({ name, ok, ...details }));
const errInfo = (e) => ({ error: e?.constructor?.name, status: e?.status, code: e?.code ?? e?.error?.code, message: String(e?.message).slice(0, 300) });

async function scenario(name, fn) {
  try {
    await fn();
  } catch (e) {
    report(name, false, errInfo(e));
  }
}

await scenario('chat', async () => {
  const r = await client.chat.completions.create({ model, messages: [{ role: 'user', content: 'Why is the sky blue?' }], max_tokens: 8 });
  report('chat', r.object === 'chat.completion' && r.choices.length === 1 && typeof r.choices[0].message.content === 'string' &&
    r.choices[0].message.role === 'assistant' && r.usage.total_tokens > 0 && !!r.choices[0].finish_reason,
  { id: r.id, content: r.choices[0].message.content, finish: r.choices[0].finish_reason, usage: r.usage });
});

await scenario('chat_stream', async () => {
  // The endless model always writes max_tokens tokens (the tiny one may stop at once).
  const stream = await client.chat.completions.create({
    model: env('ENDLESS_MODEL'), messages: [{ role: 'user', content: 'Tell me a story' }], max_tokens: 24, stream: true,
    stream_options: { include_usage: true },
  });
  let text = '', chunks = 0, finish = null, usage = null, role = null, objects = new Set();
  for await (const chunk of stream) {
    chunks++;
    objects.add(chunk.object);
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.role) role = c.delta.role;
      if (c.delta.content) text += c.delta.content;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  report('chat_stream', chunks >= 2 && text.length > 0 && role === 'assistant' && !!finish && usage?.total_tokens > 0 &&
    objects.size === 1 && objects.has('chat.completion.chunk'), { chunks, text, finish, usage, role });
});

await scenario('completion', async () => {
  const r = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 8 });
  report('completion', r.object === 'text_completion' && typeof r.choices[0].text === 'string' && r.usage.completion_tokens > 0,
    { text: r.choices[0].text, usage: r.usage });
});

await scenario('embedding', async () => {
  // The client asks for base64 by default and decodes it.
  const r = await client.embeddings.create({ model, input: ['embed me', 'and me'] });
  const dims = r.data.map((d) => d.embedding.length);
  const finite = r.data.every((d) => Array.from(d.embedding).every(Number.isFinite));
  report('embedding', r.object === 'list' && r.data.length === 2 && dims[0] > 0 && dims[0] === dims[1] && finite && r.data[1].index === 1,
    { dims, model: r.model });
});

await scenario('models', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  report('models', ids.includes(model) && ids.includes(process.env.ENDLESS_MODEL), { ids });
});

await scenario('unknown_model', async () => {
  try {
    await client.chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'hi' }] });
    report('unknown_model', false, { error: 'no error' });
  } catch (e) {
    report('unknown_model', e instanceof OpenAI.NotFoundError && e.code === 'model_not_found', errInfo(e));
  }
});

await scenario('wrong_key', async () => {
  const bad = new OpenAI({ baseURL, apiKey: 'sk-not-a-key', maxRetries: 0 });
  try {
    await bad.models.list();
    report('wrong_key', false, { error: 'no error' });
  } catch (e) {
    report('wrong_key', e instanceof OpenAI.AuthenticationError, errInfo(e));
  }
});

await scenario('missing_key', async () => {
  // No Authorization header at all (null removes the client's own).
  const none = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0, defaultHeaders: { Authorization: null } });
  try {
    await none.chat.completions.create({ model, messages: [{ role: 'user', content: 'hi' }] });
    report('missing_key', false, { error: 'no error' });
  } catch (e) {
    report('missing_key', e instanceof OpenAI.AuthenticationError, errInfo(e));
  }
});

await scenario('queue_full', async () => {
  const full = new OpenAI({ baseURL: env('FULL_BASE_URL'), apiKey: env('API_KEY'), maxRetries: 0 });
  try {
    await full.chat.completions.create({ model, messages: [{ role: 'user', content: 'hi' }] });
    report('queue_full', false, { error: 'no error' });
  } catch (e) {
    report('queue_full', e instanceof OpenAI.RateLimitError && Number(e.headers?.get('retry-after')) > 0,
      { ...errInfo(e), retryAfter: e.headers?.get('retry-after') });
  }
});

await scenario('abort_mid_stream', async () => {
  const ac = new AbortController();
  const stream = await client.chat.completions.create({
    model: env('ENDLESS_MODEL'), messages: [{ role: 'user', content: 'go on forever' }], max_tokens: 2000, stream: true,
  }, { signal: ac.signal });
  let chunks = 0, aborted = false;
  try {
    for await (const chunk of stream) {
      if (chunk.choices[0]?.delta?.content) chunks++;
      if (chunks === 2) ac.abort();
    }
  } catch (e) {
    aborted = e instanceof OpenAI.APIUserAbortError || e?.name === 'AbortError';
    if (!aborted) throw e;
  }
  // The gateway still answers.
  const r = await client.chat.completions.create({ model, messages: [{ role: 'user', content: 'still there?' }], max_tokens: 4 });
  report('abort_mid_stream', chunks >= 2 && r.choices.length === 1, { chunks, aborted, after: r.choices[0].message.content });
});
