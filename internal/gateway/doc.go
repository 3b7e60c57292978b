// Package gateway is sous's OpenAI-compatible HTTP front door. It turns
// POST /v1/chat/completions (tools and tool calls included),
// /v1/completions, /v1/embeddings and /v1/responses (stateless: the whole
// conversation in every request, nothing stored) into sous requests
// published durably (persistent, publisher-confirmed) to the request queue,
// waits for the results and streamed chunks on RabbitMQ's direct reply-to
// (AMQP) or in its own sessions of a session-enabled Azure Service Bus
// reply queue (ServiceBus), and answers in OpenAI's wire format, as one
// JSON body or as server-sent events (chat.completion.chunk with content
// and tool_calls deltas, then [DONE]; the Responses API's typed events,
// ending in response.completed).
//
// Nothing is promised before the broker confirms the request: a publish
// the broker nacks (a max-length queue with overflow reject-publish) is a
// 429 with Retry-After, a broker that is down is a 503. Each request carries
// a deadline, so a worker that has not started it by then skips it; a
// result that arrives after its HTTP request has gone is dropped.
//
// With lanes (Config.Lanes, SOUS_GATEWAY_LANES) each request goes to one
// lane's queue: the lane its X-Sous-Lane header names, else its key's
// default (the first of the key's lanes=), else the first lane. A lane the
// key may not use is a 403, an unknown one a 400; without lanes any
// X-Sous-Lane header is a 400.
//
// Concurrency: a *Server serves any number of requests at once, bounded by
// Config.MaxOpen. An *AMQP or *ServiceBus broker is safe for concurrent
// use; its supervisor, reply consumers or session receivers (and their
// lock renewers) are goroutines it owns and Close waits for. *Keys is safe for concurrent use; Watch reloads it from its file.
package gateway
