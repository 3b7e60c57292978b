// Package ollamatest runs a real Ollama server with a tiny random-weight
// model, for integration tests and the dev demo.
//
// Start (or StartT in tests) launches `ollama serve` on a free 127.0.0.1
// port with its models, HOME and log in one directory, writes the tiny
// model (internal/tinymodel), creates it as "tiny" (plus "tiny-endless",
// which never stops by itself, "tiny-scripted", whose answers are known
// exactly and which can call a tool, and any aliases the caller names) and
// returns once the model is loaded and answering. Kill and Restart let a
// fault test take the engine away mid-batch and bring it back on the same
// port with the same models.
//
// The ollama binary comes from SOUS_OLLAMA_BIN, else <repo root>/.cache/bin/ollama,
// which `make ollama` builds from the ollama Go module. A missing binary is
// an error that says to run `make ollama`: tests that need the engine fail,
// they never skip.
//
// The server runs in its own process group; Kill and Stop signal the whole
// group, so the model runners it forks go with it. The tiny model's
// weights are random: what it generates is gibberish by design; the
// scripted model's answers are tinymodel's constants.
//
// Concurrency: a *Server's methods are safe for concurrent use. Stop must
// be called (StartT registers it with t.Cleanup); it is safe to call twice.
// Unix only.
package ollamatest
