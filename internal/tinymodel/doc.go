// Package tinymodel writes a tiny llama-architecture model with random
// weights as a GGUF file, so that a real Ollama server can load and run it
// on machines that cannot download a model.
//
// The model is deterministic: the same Options give the same bytes. Its
// weights are random, so what it generates is gibberish by design; it exists
// to exercise the serving path (tokenizer, scheduler, HTTP API, batching),
// not to say anything useful.
//
// WriteScriptedFile writes the scripted model instead: a lookup table in
// the same shape whose answers are known exactly (SkyQuestion is answered
// SkyAnswer, WeatherQuestion with a tool call, ...), at any temperature, so
// tests can assert what comes back.
//
// The file is written with the ollama module's own GGUF writer
// (github.com/ollama/ollama/fs/ggml), which writes tensors concurrently;
// every tensor therefore draws from its own seeded source.
//
// Concurrency: WriteFile and WriteScriptedFile are safe for concurrent use on distinct paths.
package tinymodel
