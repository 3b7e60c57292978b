// A LangChain.js agent (langchain's createAgent with @langchain/openai's
// ChatOpenAI), unchanged but for OPENAI_BASE_URL and OPENAI_API_KEY, running
// a tool through the sous gateway to the scripted model's exact answer.
// Prints one JSON line per scenario: {"name", "ok", ...details}. Environment:
// OPENAI_BASE_URL, OPENAI_API_KEY, MODEL and the script (see tools.mjs).
import { ChatOpenAI } from '@langchain/openai';
import { createAgent, tool } from 'langchain';
import * as z from 'zod';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const report = (name, ok, details = {}) => console.log(JSON.stringify({ name, ok, ...details }));

const called = [];
const getWeather = tool(async ({ city }) => {
  called.push(city);
  return { Paris: env('WEATHER_RESULT'), London: env('PARALLEL_RESULT') }[city] ?? 'unknown';
}, {
  name: 'get_weather',
  description: 'Get the weather in a city',
  schema: z.object({ city: z.string() }),
});

async function scenario(name, fn) {
  called.length = 0;
  try {
    await fn();
  } catch (e) {
    report(name, false, { error: e?.constructor?.name, message: String(e?.message).slice(0, 400) });
  }
}

const lastText = (messages) => {
  const m = messages.at(-1);
  return typeof m.content === 'string' ? m.content : m.content.map((p) => p.text ?? '').join('');
};

// ask runs the agent: invoke, or stream with streamMode "messages", which
// makes the model stream (LangChain then merges the tool call deltas). Not
// ChatOpenAI's streaming: true: invoked that way, it estimates token usage
// with encodings it fetches from the internet (tiktoken.pages.dev).
async function ask(agent, q, stream) {
  const input = { messages: [{ role: 'user', content: q }] };
  const opts = { signal: AbortSignal.timeout(60_000) };
  if (!stream) return { messages: (await agent.invoke(input, opts)).messages, chunks: 0 };
  let messages = [], chunks = 0;
  for await (const [mode, data] of await agent.stream(input, { ...opts, streamMode: ['messages', 'values'] })) {
    if (mode === 'values') messages = data.messages;
    else chunks++;
  }
  return { messages, chunks };
}

const agent = createAgent({ model: new ChatOpenAI({ model: env('MODEL'), maxRetries: 0 }), tools: [getWeather] });
for (const stream of [false, true]) {
  const suffix = stream ? '_stream' : '';
  await scenario(`langchain_agent${suffix}`, async () => {
    const { messages, chunks } = await ask(agent, env('WEATHER_Q'), stream);
    const answer = lastText(messages);
    report(`langchain_agent${suffix}`, answer === env('WEATHER_A') && called.join() === 'Paris' && (!stream || chunks > 1),
      { answer, called, turns: messages.length, chunks });
  });
  await scenario(`langchain_parallel${suffix}`, async () => {
    const { messages, chunks } = await ask(agent, env('PARALLEL_Q'), stream);
    const answer = lastText(messages);
    report(`langchain_parallel${suffix}`, answer === env('PARALLEL_A') && [...called].sort().join() === 'London,Paris' && (!stream || chunks > 1),
      { answer, called, turns: messages.length, chunks });
  });
}
