package queue

import (
	"errors"
	"time"
)

// Delivery is one message received from the broker, not yet settled.
type Delivery struct {
	// ID is the broker message id (AMQP message_id, Service Bus MessageID).
	ID string
	// CorrelationID is the producer's correlation id, if any.
	CorrelationID string
	// ReplyTo is where the producer wants the result; empty means the
	// worker's results queue.
	ReplyTo string
	// ReplyToSessionID is set on Service Bus requests whose reply queue is
	// session-enabled.
	ReplyToSessionID string
	// ContentType is the message's declared content type, possibly empty.
	ContentType string
	// Body is the raw payload. Drivers never decode it.
	Body []byte
	// Headers holds the string-valued application headers (AMQP headers,
	// Service Bus application properties), such as traceparent.
	Headers map[string]string
	// Attempt is the 1-based number of this delivery: 1 the first time, 2
	// after one requeue or one crashed consumer, and so on. Drivers derive
	// it from the broker's delivery count where the broker keeps one.
	Attempt int
	// EnqueuedAt is when the broker accepted the message, or the producer's
	// timestamp; zero when unknown.
	EnqueuedAt time.Time
	// EnqueuedResolution is how precise EnqueuedAt is: time.Millisecond
	// for a timestamp_in_ms header and Service Bus's EnqueuedTime,
	// time.Second for the AMQP timestamp property; 0 when unknown.
	EnqueuedResolution time.Duration
	// ReceivedAt is when this worker received the delivery.
	ReceivedAt time.Time

	// Handle is owned by the driver that produced the delivery: it settles
	// the delivery through it. Callers must not touch it.
	Handle any
}

// CorrelationKey is the id a result carries back to its producer: the
// request's correlation id, or its message id when it has none.
func (d *Delivery) CorrelationKey() string {
	if d.CorrelationID != "" {
		return d.CorrelationID
	}
	return d.ID
}

// Message is an outgoing message: a result, a stream chunk or a request.
type Message struct {
	// To is the destination queue (or RabbitMQ reply-to address).
	To string
	// SessionID is set for session-enabled Service Bus queues; ignored by
	// RabbitMQ.
	SessionID     string
	MessageID     string
	CorrelationID string
	ReplyTo       string
	ContentType   string
	Body          []byte
	Headers       map[string]string
	// Persistent asks the broker to store the message durably.
	Persistent bool
}

// Action is how a delivery is settled.
type Action int

const (
	// Ack removes the delivery from the queue: its result is published.
	Ack Action = iota + 1
	// Requeue returns the delivery to the queue for another attempt.
	Requeue
	// DeadLetter moves the delivery to the dead-letter queue with a reason.
	DeadLetter
)

func (a Action) String() string {
	switch a {
	case Ack:
		return "ack"
	case Requeue:
		return "requeue"
	case DeadLetter:
		return "dead-letter"
	default:
		return "unknown"
	}
}

// Settlement is the decision taken for one delivery.
type Settlement struct {
	Action Action
	// Reason is a short machine-readable code (for example "invalid_json",
	// "max_attempts"); required for DeadLetter, recorded for Requeue.
	Reason string
	// Description is a human-readable explanation. It must not contain
	// secrets.
	Description string
	// Headers are added to the message a Requeue puts back, where the
	// driver requeues by copy (RabbitMQ) or can modify properties
	// (Service Bus).
	Headers map[string]string
}

// Dead-letter header names, shared by every driver so that operators read
// the same keys whatever the broker. Service Bus also fills its native
// DeadLetterReason and DeadLetterErrorDescription.
const (
	HeaderDeadLetterReason      = "x-sous-dead-letter-reason"
	HeaderDeadLetterDescription = "x-sous-dead-letter-description"
	HeaderAttempts              = "x-sous-attempts"
	HeaderSourceQueue           = "x-sous-source-queue"
)

// ErrStale is returned when settling a delivery whose channel, connection or
// lock is gone. The broker redelivers such a message; the caller should log
// and move on, not retry the settlement.
var ErrStale = errors.New("delivery is stale: its channel or lock was lost, the broker will redeliver it")

// ErrClosed is returned by a driver that has been closed.
var ErrClosed = errors.New("queue driver is closed")

// ErrUnroutable is returned by Publish when the broker accepted a message
// but had no queue to put it in (a results or reply queue that does not
// exist). The message is not stored anywhere.
var ErrUnroutable = errors.New("the broker has no queue for this message")

// ReasonShutdown is the requeue reason for deliveries handed back because
// the worker is stopping. Drivers that count attempts themselves do not
// count such a requeue as an attempt.
const ReasonShutdown = "shutdown"

// ReasonEngineDown is the requeue reason for deliveries handed back because
// the engine is down or lacks the worker's model: the worker's fault, not
// the request's, so it is not counted as an attempt either.
const ReasonEngineDown = "engine_down"

// ReasonHeldTooLong is the requeue reason for deliveries that waited in a
// busy worker longer than its bound for a slot (so that the broker's
// consumer_timeout never fires): not counted as an attempt.
const ReasonHeldTooLong = "held_too_long"

// ReasonDeadLetterFailed is the requeue reason for deliveries that could
// not be dead-lettered (the dead-letter queue is missing or refuses): the
// fault is the worker's, so no attempt is counted.
const ReasonDeadLetterFailed = "dead_letter_failed"

// Counts reports whether a requeue for reason spends one of the request's
// attempts. Drivers that count attempts themselves use it; a broker that
// counts every redelivery itself (Service Bus) counts them all.
func Counts(reason string) bool {
	return reason != ReasonShutdown && reason != ReasonEngineDown && reason != ReasonHeldTooLong && reason != ReasonDeadLetterFailed
}
