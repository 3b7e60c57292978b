// Package batch holds the work waiting for the inference engine and decides
// what goes next.
//
// A Batcher is a pure state machine: the caller adds items and asks for the
// next engine call at a given instant, passing the room the in-flight limit
// leaves and whether anything is on the engine. It owns no goroutine and
// reads no clock, so its policy is tested without sleeping.
//
// The policy (continuous dispatch): the unit is a request in flight, not a
// batch. Engines that take one request per call (Ollama's /api/generate and
// /api/chat, OpenAI-compatible chat) batch continuously inside, so each such
// request goes to the engine alone the moment the in-flight limit has room.
// Where the API takes a list in one call (embeddings, /v1/completions prompt
// lists), items of one key are coalesced: a list goes when it fills the room
// or the most one call takes, when the batch window has passed since its
// oldest item, or at once when the engine is idle, so low load never pays
// the window. Oldest work goes first across keys; items that cannot share an
// engine call (different model, kind or options) carry different keys and
// never share a call.
//
// Concurrency: a Batcher is not safe for concurrent use; one goroutine (the
// worker's dispatcher) owns it.
package batch
