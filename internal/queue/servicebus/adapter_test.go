package servicebus

import (
	"reflect"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/queue"
)

func sp(s string) *string { return &s }

func TestToDelivery(t *testing.T) {
	t.Parallel()
	enqueued := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	received := enqueued.Add(time.Second)
	tests := []struct {
		name string
		in   *azservicebus.ReceivedMessage
		want *queue.Delivery
	}{
		{
			name: "every field",
			in: &azservicebus.ReceivedMessage{
				MessageID:        "m1",
				CorrelationID:    sp("c1"),
				ReplyTo:          sp("replies"),
				ReplyToSessionID: sp("s1"),
				ContentType:      sp("application/json"),
				Body:             []byte(`{"prompt":"hi"}`),
				ApplicationProperties: map[string]any{
					"traceparent": "00-abc-def-01",
					"tracestate":  "k=v",
					"count":       int64(3), // not a string: not a header
					"flag":        true,
				},
				DeliveryCount: 3,
				EnqueuedTime:  &enqueued,
			},
			want: &queue.Delivery{
				ID: "m1", CorrelationID: "c1", ReplyTo: "replies", ReplyToSessionID: "s1",
				ContentType: "application/json", Body: []byte(`{"prompt":"hi"}`),
				Headers:    map[string]string{"traceparent": "00-abc-def-01", "tracestate": "k=v"},
				Attempt:    3,
				EnqueuedAt: enqueued, EnqueuedResolution: time.Millisecond,
				ReceivedAt: received,
			},
		},
		{
			name: "bare message",
			in:   &azservicebus.ReceivedMessage{MessageID: "m2", DeliveryCount: 1},
			want: &queue.Delivery{ID: "m2", Attempt: 1, ReceivedAt: received},
		},
		{
			name: "no delivery count still counts as the first attempt",
			in:   &azservicebus.ReceivedMessage{MessageID: "m3"},
			want: &queue.Delivery{ID: "m3", Attempt: 1, ReceivedAt: received},
		},
		{
			name: "string AMQP value body",
			in: &azservicebus.ReceivedMessage{MessageID: "m4", DeliveryCount: 1,
				RawAMQPMessage: &azservicebus.AMQPAnnotatedMessage{Body: azservicebus.AMQPAnnotatedMessageBody{Value: `{"prompt":"v"}`}}},
			want: &queue.Delivery{ID: "m4", Attempt: 1, ReceivedAt: received, Body: []byte(`{"prompt":"v"}`)},
		},
		{
			name: "several data sections",
			in: &azservicebus.ReceivedMessage{MessageID: "m5", DeliveryCount: 2,
				RawAMQPMessage: &azservicebus.AMQPAnnotatedMessage{Body: azservicebus.AMQPAnnotatedMessageBody{Data: [][]byte{[]byte(`{"prompt"`), []byte(`:"d"}`)}}}},
			want: &queue.Delivery{ID: "m5", Attempt: 2, ReceivedAt: received, Body: []byte(`{"prompt":"d"}`)},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got := toDelivery(tt.in, received)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("toDelivery =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

func TestToMessage(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   queue.Message
		want *azservicebus.Message
	}{
		{
			name: "result to a session-enabled reply queue",
			in: queue.Message{
				To: "replies", SessionID: "s1", MessageID: "r1", CorrelationID: "c1",
				ContentType: "application/json", Body: []byte(`{"id":"1"}`),
				Headers: map[string]string{"traceparent": "00-abc-def-01"}, Persistent: true,
			},
			want: &azservicebus.Message{
				SessionID: sp("s1"), MessageID: sp("r1"), CorrelationID: sp("c1"),
				ContentType: sp("application/json"), Body: []byte(`{"id":"1"}`),
				ApplicationProperties: map[string]any{"traceparent": "00-abc-def-01"},
			},
		},
		{
			name: "request with a reply address",
			in:   queue.Message{To: "requests", ReplyTo: "replies", Body: []byte("x")},
			want: &azservicebus.Message{ReplyTo: sp("replies"), Body: []byte("x")},
		},
		{
			name: "empty fields stay unset",
			in:   queue.Message{To: "q"},
			want: &azservicebus.Message{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := toMessage(tt.in); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("toMessage =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

func TestEntityPath(t *testing.T) {
	t.Parallel()
	tests := map[string]string{
		"replies":                                 "replies",
		"sb://ns.servicebus.windows.net/replies":  "replies",
		"sb://ns.servicebus.windows.net/replies/": "replies",
		"amqps://ns.servicebus.windows.net/a/b":   "a/b",
		"":                                        "",
	}
	for in, want := range tests {
		if got := entityPath(in); got != want {
			t.Errorf("entityPath(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestForwardCopyLeavesTheReceivedMessageAlone(t *testing.T) {
	t.Parallel()
	in := &azservicebus.ReceivedMessage{
		MessageID: "m1", Body: []byte("b"), ReplyTo: sp("replies"), ReplyToSessionID: sp("s1"),
		ApplicationProperties: map[string]any{"traceparent": "tp"},
		PartitionKey:          sp("p"),
	}
	got := forwardCopy(in, map[string]any{queue.HeaderDeadLetterReason: "bad"})
	want := map[string]any{"traceparent": "tp", queue.HeaderDeadLetterReason: "bad"}
	if !reflect.DeepEqual(got.ApplicationProperties, want) {
		t.Errorf("properties = %v, want %v", got.ApplicationProperties, want)
	}
	if len(in.ApplicationProperties) != 1 {
		t.Errorf("the received message's properties changed: %v", in.ApplicationProperties)
	}
	if got.Properties.MessageID != "m1" || *got.Properties.ReplyToGroupID != "s1" || got.MessageAnnotations != nil {
		t.Errorf("copy = %+v", got)
	}
	if !reflect.DeepEqual(got.Body.Data, [][]byte{[]byte("b")}) {
		t.Errorf("copy body = %+v", got.Body)
	}
}

// FuzzToDelivery feeds the mapping the shapes a producer controls: body
// sections, property values and the delivery count.
func FuzzToDelivery(f *testing.F) {
	f.Add([]byte(`{"prompt":"hi"}`), "", "traceparent", "00-abc-01", int64(0), uint32(1), false)
	f.Add([]byte(nil), `{"prompt":"v"}`, "n", "", int64(7), uint32(0), true)
	f.Fuzz(func(t *testing.T, data []byte, value, key, str string, num int64, count uint32, split bool) {
		m := &azservicebus.ReceivedMessage{
			MessageID:             "m",
			DeliveryCount:         count,
			ApplicationProperties: map[string]any{key: str, key + "#n": num, key + "#b": data},
			RawAMQPMessage:        &azservicebus.AMQPAnnotatedMessage{},
		}
		switch {
		case split && len(data) > 1:
			m.RawAMQPMessage.Body.Data = [][]byte{data[:1], data[1:]}
		case value != "":
			m.RawAMQPMessage.Body.Value = value
		default:
			m.Body = data
		}
		d := toDelivery(m, time.Time{})
		if d.Attempt < 1 {
			t.Fatalf("Attempt = %d", d.Attempt)
		}
		if d.Headers[key] != str || len(d.Headers) != 1 {
			t.Fatalf("Headers = %v, want only the string property", d.Headers)
		}
		if split && len(data) > 1 && string(d.Body) != string(data) {
			t.Fatalf("Body = %q, want %q", d.Body, data)
		}
	})
}
