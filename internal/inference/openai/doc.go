// Package openai is the engine driver for OpenAI-compatible servers: vLLM,
// the llama.cpp server, TGI, and Ollama's /v1 endpoints.
//
// Chat items go to /v1/chat/completions, one call each, concurrently.
// Prompt items of a batch (same model and options) go as ONE
// /v1/completions call with a list of prompts, which vLLM batches natively;
// answers are matched back by choices[].index. Servers that refuse a list
// (Ollama 0.6.5 answers 400) are detected on the first batch and from then
// on get concurrent single-prompt calls; BatchPrompts forces either mode.
// Embedding items go as one /v1/embeddings call with a list input.
//
// The Engine also says what it can about the server, for a caller that
// sizes its work to it: TakesList (which kinds go as one list call), Models
// (GET /v1/models), Slots (llama.cpp's GET /props total_slots, TGI's GET
// /info max_concurrent_requests) and Queue (the running and waiting gauges
// of vLLM's, llama.cpp's or TGI's GET /metrics). /props, /info and
// /metrics live at the server's root, beside /v1.
//
// Tools, tool_choice and tool messages go as OpenAI defines them; an
// assistant message that only calls tools is sent with content null
// (Ollama 0.6.5's /v1 drops the calls of a message whose content is a
// string). Answers' arguments, JSON strings, become JSON objects; streamed
// argument fragments are joined by index and handed on as whole calls.
//
// Concurrency: an *Engine is safe for concurrent use and shares one
// http.Client.
package openai
