// Package ollama is the Ollama engine driver, on the official client
// github.com/ollama/ollama/api.
//
// Generation and chat items of a batch run as concurrent calls: Ollama
// schedules them onto its parallel slots (OLLAMA_NUM_PARALLEL) and batches
// them on the GPU itself. Embedding items of a batch go as ONE /api/embed
// call with a list input, and the vectors are split back per item.
//
// TakesList and Models (GET /api/tags) tell a caller what the engine
// takes and has. Slots always says "cannot say": Ollama shows
// OLLAMA_NUM_PARALLEL on no endpoint.
//
// Chat goes to /api/chat with the request's tools passed on raw (the api
// package's Tool type would drop schema keywords it does not know). Ollama
// has no tool_choice: "auto" is its default, "none" is sent as no tools,
// and a forced call is refused as a permanent error rather than ignored.
// Tool calls come back without ids; the driver gives each one.
//
// Concurrency: an *Engine is safe for concurrent use and shares one
// http.Client across all calls.
package ollama
