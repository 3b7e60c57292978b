// Package servicebus is the Azure Service Bus queue driver: it receives
// requests from one queue in PeekLock mode, settles them (Complete, Abandon,
// DeadLetterMessage), renews their locks while they are held and publishes
// results to any queue, through the official SDK
// (github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus).
//
// A Driver connects lazily: New checks the configuration and builds the SDK
// client; the first Receive, Publish or Ready opens the AMQP connection. It
// authenticates with a connection string (a secret.Value, never logged) or
// with a namespace and azidentity's DefaultAzureCredential (workload identity
// on AKS).
//
// Mapping: Delivery.ID is the MessageID, Attempt the DeliveryCount (Service
// Bus counts from 1 and adds one on every abandon or lock expiry), Headers
// the string-valued application properties (traceparent, tracestate, ...).
// Retry policy is not the driver's job: the worker reads Attempt.
//
// Locks: Service Bus keeps a received message locked for the queue's lock
// duration (60s by default, 5 minutes at most). While a delivery is held, a
// goroutine owned by the Driver renews its lock every
// Config.LockRenewInterval, or at half the remaining lock time when that is
// sooner. Renewals run concurrently, the most urgent first, at most 32 at
// once, so one slow renewal does not hold back the other locks. A lock that
// cannot be renewed is logged; settling that delivery
// then returns an error wrapping queue.ErrStale without another round trip,
// and the broker redelivers the message. Service Bus reports a lost lock the
// same way when it is the one that notices.
//
// Concurrency: all methods are safe for concurrent use. Receive calls are
// serialized (the SDK forbids concurrent ReceiveMessages). Each Delivery
// must be settled once; Settle may be called again only after an error that
// does not wrap queue.ErrStale. Shutdown: StopReceiving (Receive then returns
// queue.ErrClosed, held deliveries can still be settled), then Close, which
// stops lock renewal, closes the receiver, every cached sender and the
// client. Close is safe twice and before any Receive; deliveries still held
// at Close are redelivered when their locks expire.
package servicebus
