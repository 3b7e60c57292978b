// Tools through the sous gateway with the official OpenAI Node client, on the
// scripted model (internal/tinymodel), whose answers are exact. Prints one
// JSON line per scenario: {"name", "ok", ...details}. Environment: BASE_URL,
// API_KEY, MODEL (the scripted model) and the script: WEATHER_Q, WEATHER_CALL,
// WEATHER_RESULT, WEATHER_A, PARALLEL_Q, PARALLEL_RESULT, PARALLEL_A.
import OpenAI from 'openai';
import { isDeepStrictEqual } from 'node:util';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const model = env('MODEL');
const client = new OpenAI({ baseURL: env('BASE_URL'), apiKey: env('API_KEY'), maxRetries: 0, timeout: 120_000 });

const report = (name, ok, details = {}) => console.log(JSON.stringify({ name, ok, ...details }));
const errInfo = (e) => ({ error: e?.constructor?.name, status: e?.status, code: e?.code ?? e?.error?.code, param: e?.param, message: String(e?.message).slice(0, 300) });

async function scenario(name, fn) {
  try {
    await fn();
  } catch (e) {
    report(name, false, errInfo(e));
  }
}

const tools = [{
  type: 'function',
  function: {
    name: 'get_weather', description: 'Get the weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
}];
// The tool itself: what the script expects for each city.
const weather = { Paris: env('WEATHER_RESULT'), London: env('PARALLEL_RESULT') };
const runCalls = (calls) => calls.map((c) => ({
  role: 'tool', tool_call_id: c.id, content: weather[JSON.parse(c.function.arguments).city] ?? 'unknown',
}));
const summary = (calls) => calls.map((c) => `${c.function.name}${c.function.arguments}`);

// stream reads a streamed answer and reassembles it from its deltas, as
// OpenAI documents: text concatenated, tool calls by index.
async function stream(params) {
  const s = await client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
  let content = '', finish = null, usage = null, role = null, chunks = 0;
  const calls = [];
  for await (const chunk of s) {
    chunks++;
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.role) role = c.delta.role;
      if (c.delta.content) content += c.delta.content;
      for (const tc of c.delta.tool_calls ?? []) {
        calls[tc.index] ??= { id: '', type: 'function', function: { name: '', arguments: '' } };
        const acc = calls[tc.index];
        if (tc.id) acc.id = tc.id;
        if (tc.function?.name) acc.function.name += tc.function.name;
        if (tc.function?.arguments) acc.function.arguments += tc.function.arguments;
      }
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  return { content, calls, finish, usage, role, chunks };
}

await scenario('tool_round_trip', async () => {
  const messages = [{ role: 'user', content: env('WEATHER_Q') }];
  const first = await client.chat.completions.create({ model, messages, tools });
  const m = first.choices[0].message;
  const calls = m.tool_calls ?? [];
  const callOK = first.choices[0].finish_reason === 'tool_calls' && m.content === null && calls.length === 1 &&
    calls[0].id.startsWith('call_') && calls[0].type === 'function' &&
    isDeepStrictEqual(summary(calls), ['get_weather{"city":"Paris"}']);
  messages.push(m, ...runCalls(calls));
  const second = await client.chat.completions.create({ model, messages, tools });
  report('tool_round_trip', callOK && second.choices[0].message.content === env('WEATHER_A') && second.choices[0].finish_reason === 'stop',
    { calls: summary(calls), answer: second.choices[0].message.content });
});

await scenario('tool_stream', async () => {
  const messages = [{ role: 'user', content: env('WEATHER_Q') }];
  const first = await stream({ model, messages, tools });
  const callOK = first.finish === 'tool_calls' && first.role === 'assistant' && first.content === '' && first.usage?.total_tokens > 0 &&
    first.calls.length === 1 && first.calls[0].id.startsWith('call_') && isDeepStrictEqual(summary(first.calls), ['get_weather{"city":"Paris"}']);
  messages.push({ role: 'assistant', content: null, tool_calls: first.calls }, ...runCalls(first.calls));
  const second = await stream({ model, messages, tools });
  report('tool_stream', callOK && second.content === env('WEATHER_A') && second.finish === 'stop' && second.calls.length === 0,
    { calls: summary(first.calls), chunks: first.chunks, usage: first.usage, answer: second.content });
});

await scenario('parallel_tool_calls', async () => {
  const messages = [{ role: 'user', content: env('PARALLEL_Q') }];
  const first = await client.chat.completions.create({ model, messages, tools, parallel_tool_calls: true });
  const calls = first.choices[0].message.tool_calls ?? [];
  const want = ['get_weather{"city":"Paris"}', 'get_weather{"city":"London"}'];
  messages.push(first.choices[0].message, ...runCalls(calls));
  const second = await client.chat.completions.create({ model, messages, tools });
  // And streamed: two calls, indexes 0 and 1.
  const streamed = await stream({ model, messages: messages.slice(0, 1), tools });
  report('parallel_tool_calls', isDeepStrictEqual(summary(calls), want) && calls[0].id !== calls[1].id &&
    second.choices[0].message.content === env('PARALLEL_A') && isDeepStrictEqual(summary(streamed.calls), want) && streamed.finish === 'tool_calls',
  { calls: summary(calls), streamed: summary(streamed.calls), answer: second.choices[0].message.content });
});

await scenario('tool_choice', async () => {
  const messages = [{ role: 'user', content: env('WEATHER_Q') }];
  // "none": the engine gets no tools, and the model's text is the answer.
  const none = await client.chat.completions.create({ model, messages, tools, tool_choice: 'none' });
  const auto = await client.chat.completions.create({ model, messages, tools, tool_choice: 'auto' });
  // Forcing a call: Ollama cannot, and sous refuses rather than ignores it.
  const forced = [];
  for (const tool_choice of ['required', { type: 'function', function: { name: 'get_weather' } }]) {
    try {
      await client.chat.completions.create({ model, messages, tools, tool_choice });
      forced.push('no error');
    } catch (e) {
      forced.push(e instanceof OpenAI.BadRequestError ? `${e.code} ${e.param}` : String(e));
    }
  }
  report('tool_choice', none.choices[0].message.content === env('WEATHER_CALL') && !none.choices[0].message.tool_calls &&
    auto.choices[0].message.tool_calls?.length === 1 && isDeepStrictEqual(forced, ['engine_rejected tool_choice', 'engine_rejected tool_choice']),
  { none: none.choices[0].message.content, forced });
});

await scenario('json_output', async () => {
  const messages = [{ role: 'user', content: env('WEATHER_Q') }];
  const want = JSON.parse(env('WEATHER_CALL'));
  const obj = await client.chat.completions.create({ model, messages, response_format: { type: 'json_object' } });
  const schema = await client.chat.completions.create({
    model, messages, response_format: {
      type: 'json_schema', json_schema: {
        name: 'call', schema: {
          type: 'object', required: ['name', 'arguments'],
          properties: { name: { type: 'string' }, arguments: { type: 'object', properties: { city: { type: 'string' } } } },
        },
      },
    },
  });
  report('json_output', isDeepStrictEqual(JSON.parse(obj.choices[0].message.content), want) &&
    isDeepStrictEqual(JSON.parse(schema.choices[0].message.content), want),
  { json_object: obj.choices[0].message.content, json_schema: schema.choices[0].message.content });
});

await scenario('bad_tool_input', async () => {
  const user = { role: 'user', content: env('WEATHER_Q') };
  const cases = {
    'tools[0].function.name': { messages: [user], tools: [{ type: 'function', function: { parameters: { type: 'object' } } }] },
    'messages[1].tool_calls[0].function.arguments': {
      messages: [user, { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{city: Paris' } }] }],
      tools,
    },
    'messages.[1].role': { messages: [user, { role: 'tool', tool_call_id: 'call_1', content: 'sunny' }], tools },
  };
  const got = {};
  for (const [param, body] of Object.entries(cases)) {
    try {
      await client.chat.completions.create({ model, ...body });
      got[param] = 'no error';
    } catch (e) {
      got[param] = e instanceof OpenAI.BadRequestError && e.type === 'invalid_request_error' ? e.param : String(e);
    }
  }
  report('bad_tool_input', Object.entries(got).every(([k, v]) => k === v), { got });
});

// The Responses API, stateless: the conversation goes back as input items.
const flatTools = tools.map((t) => ({ type: 'function', ...t.function, strict: false }));

await scenario('responses_round_trip', async () => {
  const input = [{ role: 'user', content: env('PARALLEL_Q') }];
  const first = await client.responses.create({ model, input, tools: flatTools, store: false, instructions: 'Use the tools.' });
  const calls = first.output.filter((o) => o.type === 'function_call');
  input.push(...first.output, ...calls.map((c) => ({
    type: 'function_call_output', call_id: c.call_id, output: weather[JSON.parse(c.arguments).city] ?? 'unknown',
  })));
  const second = await client.responses.create({ model, input, tools: flatTools, store: false, instructions: 'Use the tools.' });
  report('responses_round_trip', first.status === 'completed' && isDeepStrictEqual(calls.map((c) => `${c.name}${c.arguments}`),
    ['get_weather{"city":"Paris"}', 'get_weather{"city":"London"}']) && second.output_text === env('PARALLEL_A') && second.usage.total_tokens > 0,
  { calls: calls.map((c) => c.call_id), answer: second.output_text });
});

await scenario('responses_stream', async () => {
  const input = [{ role: 'user', content: env('WEATHER_Q') }];
  const s = await client.responses.create({ model, input, tools: flatTools, store: false, stream: true });
  const types = [];
  let args = '', completed = null;
  for await (const e of s) {
    types.push(e.type);
    if (e.type === 'response.function_call_arguments.delta') args += e.delta;
    if (e.type === 'response.completed') completed = e.response;
  }
  const call = completed?.output.find((o) => o.type === 'function_call');
  input.push(call, { type: 'function_call_output', call_id: call.call_id, output: weather.Paris });
  // The SDK's stream helper reassembles the text from response.output_text.delta.
  const second = await client.responses.stream({ model, input, tools: flatTools, store: false }).finalResponse();
  report('responses_stream', args === '{"city":"Paris"}' && types[0] === 'response.created' && types.at(-1) === 'response.completed' &&
    second.output_text === env('WEATHER_A'), { types: [...new Set(types)], answer: second.output_text });
});

await scenario('responses_refused', async () => {
  const got = {};
  for (const [param, extra] of Object.entries({ previous_response_id: { previous_response_id: 'resp_1' }, store: { store: true } })) {
    try {
      await client.responses.create({ model, input: env('WEATHER_Q'), ...extra });
      got[param] = 'no error';
    } catch (e) {
      got[param] = e instanceof OpenAI.BadRequestError && e.code === 'unsupported_parameter' ? e.param : String(e);
    }
  }
  report('responses_refused', Object.entries(got).every(([k, v]) => k === v), { got });
});
