// Drives the sous gateway in the node test cluster (TestNodeGatewayOpenAIClient)
// with the official OpenAI Node client, the one integration/gateway pins in
// its node/package-lock.json: one plain chat and one streamed chat, one JSON
// line each on stdout. The Go test checks the lines. Environment: OPENAI_MODULE
// (the client's ESM entry, a file path), BASE_URL, API_KEY, MODEL.
import { pathToFileURL } from 'node:url';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const { default: OpenAI } = await import(pathToFileURL(env('OPENAI_MODULE')).href);
const model = env('MODEL');
const client = new OpenAI({ baseURL: env('BASE_URL'), apiKey: env('API_KEY'), maxRetries: 0, timeout: 120_000 });

const report = (name, details) => console.log(JSON.stringify({ name, ...details }));
const errInfo = (e) => ({ error: e?.constructor?.name, status: e?.status, code: e?.code ?? e?.error?.code, message: String(e?.message).slice(0, 300) });

async function scenario(name, fn) {
  try {
    await fn();
  } catch (e) {
    report(name, errInfo(e));
  }
}

await scenario('chat', async () => {
  const r = await client.chat.completions.create({ model, messages: [{ role: 'user', content: 'Why is the sky blue?' }], max_tokens: 16 });
  report('chat', {
    id: r.id, object: r.object, model: r.model, choices: r.choices.length,
    role: r.choices[0].message.role, content: r.choices[0].message.content, finish: r.choices[0].finish_reason, usage: r.usage,
  });
});

await scenario('chat_stream', async () => {
  const stream = await client.chat.completions.create({
    model, messages: [{ role: 'user', content: 'Why is the sky blue?' }], max_tokens: 16, stream: true,
    stream_options: { include_usage: true },
  });
  let content = '', chunks = 0, finish = null, usage = null, role = null, id = null;
  const objects = new Set();
  for await (const chunk of stream) {
    chunks++;
    id ??= chunk.id;
    objects.add(chunk.object);
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.role) role = c.delta.role;
      if (c.delta.content) content += c.delta.content;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  report('chat_stream', { id, objects: [...objects], chunks, role, content, finish, usage });
});
