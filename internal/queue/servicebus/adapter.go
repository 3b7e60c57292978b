package servicebus

import (
	"context"
	"maps"
	"net/url"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/queue"
)

// The driver talks to the SDK through these small interfaces, so that its
// mapping, settlement and renewal logic is tested with hand-written fakes.
// *azservicebus.Receiver and *azservicebus.Sender satisfy them.
type (
	receiver interface {
		ReceiveMessages(ctx context.Context, maxMessages int, options *azservicebus.ReceiveMessagesOptions) ([]*azservicebus.ReceivedMessage, error)
		Close(ctx context.Context) error
	}

	settler interface {
		CompleteMessage(ctx context.Context, m *azservicebus.ReceivedMessage, options *azservicebus.CompleteMessageOptions) error
		AbandonMessage(ctx context.Context, m *azservicebus.ReceivedMessage, options *azservicebus.AbandonMessageOptions) error
		DeadLetterMessage(ctx context.Context, m *azservicebus.ReceivedMessage, options *azservicebus.DeadLetterOptions) error
	}

	lockRenewer interface {
		RenewMessageLock(ctx context.Context, m *azservicebus.ReceivedMessage, options *azservicebus.RenewMessageLockOptions) error
	}

	peeker interface {
		PeekMessages(ctx context.Context, maxMessageCount int, options *azservicebus.PeekMessagesOptions) ([]*azservicebus.ReceivedMessage, error)
	}

	sender interface {
		SendMessage(ctx context.Context, m *azservicebus.Message, options *azservicebus.SendMessageOptions) error
		SendAMQPAnnotatedMessage(ctx context.Context, m *azservicebus.AMQPAnnotatedMessage, options *azservicebus.SendAMQPAnnotatedMessageOptions) error
		Close(ctx context.Context) error
	}
)

var (
	_ receiver    = (*azservicebus.Receiver)(nil)
	_ settler     = (*azservicebus.Receiver)(nil)
	_ lockRenewer = (*azservicebus.Receiver)(nil)
	_ peeker      = (*azservicebus.Receiver)(nil)
	_ sender      = (*azservicebus.Sender)(nil)
)

// backend is what a Driver is built from: the SDK in New, fakes in tests.
type backend struct {
	recv      receiver
	settle    settler
	renew     lockRenewer
	peek      peeker
	newSender func(queue string) (sender, error)
	// close closes what the driver's parts share (the SDK client).
	close func(ctx context.Context) error
}

func sdkBackend(c *azservicebus.Client, r *azservicebus.Receiver) backend {
	return backend{
		recv:   r,
		settle: r,
		renew:  r,
		peek:   r,
		newSender: func(queue string) (sender, error) {
			return c.NewSender(queue, nil)
		},
		close: c.Close,
	}
}

// toDelivery maps a received message. The Handle is set by the caller.
func toDelivery(m *azservicebus.ReceivedMessage, receivedAt time.Time) *queue.Delivery {
	d := &queue.Delivery{
		ID:               m.MessageID,
		CorrelationID:    deref(m.CorrelationID),
		ReplyTo:          deref(m.ReplyTo),
		ReplyToSessionID: deref(m.ReplyToSessionID),
		ContentType:      deref(m.ContentType),
		Body:             body(m),
		Attempt:          max(1, int(m.DeliveryCount)),
		ReceivedAt:       receivedAt,
	}
	if m.EnqueuedTime != nil {
		d.EnqueuedAt, d.EnqueuedResolution = *m.EnqueuedTime, time.Millisecond
	}
	for k, v := range m.ApplicationProperties {
		if s, ok := v.(string); ok {
			if d.Headers == nil {
				d.Headers = make(map[string]string, len(m.ApplicationProperties))
			}
			d.Headers[k] = s
		}
	}
	return d
}

// body returns the payload. The SDK fills Body only for a single Data
// section; producers on other AMQP clients may send several Data sections or
// a string or binary AMQP value, which would otherwise arrive empty.
func body(m *azservicebus.ReceivedMessage) []byte {
	if m.Body != nil || m.RawAMQPMessage == nil {
		return m.Body
	}
	b := m.RawAMQPMessage.Body
	switch {
	case len(b.Data) > 1:
		var out []byte
		for _, part := range b.Data {
			out = append(out, part...)
		}
		return out
	case b.Value != nil:
		switch v := b.Value.(type) {
		case string:
			return []byte(v)
		case []byte:
			return v
		}
	}
	return nil
}

// toMessage maps an outgoing message. Persistent is ignored: Service Bus
// stores every message durably.
func toMessage(m queue.Message) *azservicebus.Message {
	out := &azservicebus.Message{
		Body:          m.Body,
		MessageID:     ptr(m.MessageID),
		CorrelationID: ptr(m.CorrelationID),
		SessionID:     ptr(m.SessionID),
		ContentType:   ptr(m.ContentType),
		ReplyTo:       ptr(m.ReplyTo),
	}
	if len(m.Headers) > 0 {
		out.ApplicationProperties = make(map[string]any, len(m.Headers))
		for k, v := range m.Headers {
			out.ApplicationProperties[k] = v
		}
	}
	return out
}

// forwardCopy is the message a DeadLetter settlement sends to
// Config.DeadLetterQueue: the AMQP message as received, body sections
// untouched, with its properties and the dead-letter properties added. It is
// built from RawAMQPMessage, not from ReceivedMessage.Body, which the SDK
// fills only for a body of one data section: several data sections, an
// amqp-value or an amqp-sequence would be copied empty. What the broker
// added on delivery (the x-opt-* annotations: lock, sequence number,
// enqueued time, partition key, schedule), the delivery state and the
// header (TTL, delivery count) are left out: the copy is a new message, and
// keeps its MessageID for duplicate detection.
func forwardCopy(m *azservicebus.ReceivedMessage, props map[string]any) *azservicebus.AMQPAnnotatedMessage {
	raw := m.RawAMQPMessage
	if raw == nil { // not from the SDK: rebuild what it would have received
		raw = &azservicebus.AMQPAnnotatedMessage{
			ApplicationProperties: m.ApplicationProperties,
			Body:                  azservicebus.AMQPAnnotatedMessageBody{Data: [][]byte{m.Body}},
			Properties: &azservicebus.AMQPAnnotatedMessageProperties{
				MessageID: m.MessageID, CorrelationID: anyString(m.CorrelationID), ContentType: m.ContentType,
				ReplyTo: m.ReplyTo, ReplyToGroupID: m.ReplyToSessionID, GroupID: m.SessionID,
				Subject: m.Subject, To: m.To,
			},
		}
	}
	out := &azservicebus.AMQPAnnotatedMessage{
		Body:                  raw.Body,
		ApplicationProperties: maps.Clone(raw.ApplicationProperties),
	}
	if out.ApplicationProperties == nil {
		out.ApplicationProperties = make(map[string]any, len(props))
	}
	maps.Copy(out.ApplicationProperties, props)
	if raw.Properties != nil {
		p := *raw.Properties
		// The copy must not expire with the original, and user-id is
		// checked against the sender's identity by some brokers.
		p.AbsoluteExpiryTime, p.UserID = nil, nil
		out.Properties = &p
	}
	for k, v := range raw.MessageAnnotations {
		if s, ok := k.(string); ok && strings.HasPrefix(s, "x-opt-") {
			continue
		}
		if out.MessageAnnotations == nil {
			out.MessageAnnotations = make(map[any]any, len(raw.MessageAnnotations))
		}
		out.MessageAnnotations[k] = v
	}
	return out
}

func anyString(s *string) any {
	if s == nil {
		return nil
	}
	return *s
}

// entityPath turns a reply address into a queue name: Service Bus producers
// may set ReplyTo to a queue name or to an absolute
// "sb://<ns>.servicebus.windows.net/<queue>" address.
func entityPath(to string) string {
	if !strings.Contains(to, "://") {
		return to
	}
	u, err := url.Parse(to)
	if err != nil || u.Path == "" {
		return to
	}
	return strings.Trim(u.Path, "/")
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func ptr(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}
