// Package inference defines what sous asks of an inference engine: a batch of
// requests that share a model and options goes in, one result per request
// comes out, each either a response or a classified error.
//
// Engine drivers live in sub-packages (ollama, openai). A driver never fails
// a whole batch because one item failed; it reports per-item errors, and
// whole-batch rejections (out of memory, overload) as an *Error with a Kind
// that tells the caller whether to retry, shrink, or give up.
//
// Chat requests may offer Tools; an answer that calls them holds
// Message.ToolCalls in one shape whatever the engine (an ID on every call,
// Arguments a JSON object) and DoneReason DoneToolCalls.
//
// Concurrency: drivers are safe for concurrent use; a Request's Stream
// and StreamToolCalls callbacks are called from one goroutine at a time, in
// order.
package inference
