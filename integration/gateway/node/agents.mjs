// An OpenAI Agents SDK (@openai/agents) agent, unchanged but for
// OPENAI_BASE_URL and OPENAI_API_KEY (and OPENAI_AGENTS_DISABLE_TRACING, so
// that it does not export traces to OpenAI), running a tool through the sous
// gateway to the scripted model's exact answer, on the SDK's default API
// (the Responses API). Prints one JSON line per scenario: {"name", "ok",
// ...details}. Environment: as langchain.mjs.
import { Agent, run, tool } from '@openai/agents';
import * as z from 'zod';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const report = (name, ok, details = {}) => console.log(JSON.stringify({ name, ok, ...details }));

const called = [];
const getWeather = tool({
  name: 'get_weather',
  description: 'Get the weather in a city',
  parameters: z.object({ city: z.string() }),
  execute: async ({ city }) => {
    called.push(city);
    return { Paris: env('WEATHER_RESULT'), London: env('PARALLEL_RESULT') }[city] ?? 'unknown';
  },
});

const agent = new Agent({
  name: 'Weather', instructions: 'Answer with the weather tool.', model: env('MODEL'), tools: [getWeather],
});

async function scenario(name, fn) {
  called.length = 0;
  try {
    await fn();
  } catch (e) {
    report(name, false, { error: e?.constructor?.name, message: String(e?.message).slice(0, 400) });
  }
}

for (const stream of [false, true]) {
  const suffix = stream ? '_stream' : '';
  const go = async (q) => {
    const r = await run(agent, q, { stream });
    if (stream) {
      for await (const _ of r) { /* the events; finalOutput after them */ }
      await r.completed;
    }
    return r.finalOutput;
  };
  await scenario(`agents_sdk${suffix}`, async () => {
    const answer = await go(env('WEATHER_Q'));
    report(`agents_sdk${suffix}`, answer === env('WEATHER_A') && called.join() === 'Paris', { answer, called });
  });
  await scenario(`agents_sdk_parallel${suffix}`, async () => {
    const answer = await go(env('PARALLEL_Q'));
    report(`agents_sdk_parallel${suffix}`, answer === env('PARALLEL_A') && [...called].sort().join() === 'London,Paris', { answer, called });
  });
}
