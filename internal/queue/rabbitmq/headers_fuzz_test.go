package rabbitmq

import (
	"encoding/binary"
	"math"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
)

// FuzzDeliveryHeaders feeds the header parsing (attempt, stringHeaders,
// toDelivery) the tables a producer can send: any keys, any AMQP field
// types, nested tables and arrays, and a forged x-delivery-count of any
// type and value (classic queues pass a producer's header through; quorum
// queues overwrite it). A delivery always gets a positive attempt number,
// and exactly its string-valued headers.
func FuzzDeliveryHeaders(f *testing.F) {
	f.Add([]byte("\x10x-delivery-count\x01\x00\x00\x00\x00\x00\x00\x00\x03"), false)
	f.Add([]byte("\x10x-delivery-count\x01\x7f\xff\xff\xff\xff\xff\xff\xff"), true)
	f.Add([]byte("\x10x-delivery-count\x02\xff\xff\xff\xfb"), false)
	f.Add([]byte("\x0btraceparent\x04\x3700-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), false)
	f.Add([]byte("\x01a\x06\x01b\x05\x00\x01c\x07"), true)
	f.Fuzz(func(t *testing.T, data []byte, redelivered bool) {
		headers := table(&data, 0)
		raw := amqp.Delivery{Headers: headers, Redelivered: redelivered, MessageId: "m", Body: []byte("{}")}
		d := (&Driver{}).toDelivery(nil, raw)
		if d.Attempt < 1 {
			t.Fatalf("attempt %d from headers %#v", d.Attempt, headers)
		}
		if redelivered && d.Attempt < 2 {
			t.Fatalf("a redelivered message has attempt %d", d.Attempt)
		}
		n := 0
		for k, v := range headers {
			var want string
			switch v := v.(type) {
			case string:
				want = v
			case []byte:
				want = string(v)
			default:
				if _, ok := d.Headers[k]; ok {
					t.Fatalf("header %q of type %T became a string header", k, v)
				}
				continue
			}
			n++
			if got, ok := d.Headers[k]; !ok || got != want {
				t.Fatalf("header %q = %q, want %q", k, got, want)
			}
		}
		if len(d.Headers) != n {
			t.Fatalf("%d string headers from %d", len(d.Headers), n)
		}
	})
}

// table decodes a header table from fuzz bytes: entries of a key (length
// byte, bytes), a type byte and a value, nested up to depth 3.
func table(data *[]byte, depth int) amqp.Table {
	t := amqp.Table{}
	for len(*data) > 1 && len(t) < 16 {
		k := take(data, int((*data)[0])+1)
		if len(k) == 0 {
			break
		}
		t[string(k[1:])] = value(data, depth)
	}
	return t
}

func value(data *[]byte, depth int) any {
	kind := take(data, 1)
	if len(kind) == 0 {
		return nil
	}
	switch kind[0] % 10 {
	case 1:
		return int64(binary.BigEndian.Uint64(pad(take(data, 8), 8)))
	case 2:
		return int32(binary.BigEndian.Uint32(pad(take(data, 4), 4)))
	case 3:
		return int(int64(binary.BigEndian.Uint64(pad(take(data, 8), 8))))
	case 4:
		n := take(data, 1)
		if len(n) == 0 {
			return ""
		}
		return string(take(data, int(n[0])))
	case 5:
		n := take(data, 1)
		if len(n) == 0 {
			return []byte(nil)
		}
		return take(data, int(n[0]))
	case 6:
		if depth >= 3 {
			return nil
		}
		return table(data, depth+1)
	case 7:
		return nil
	case 8:
		return math.Float64frombits(binary.BigEndian.Uint64(pad(take(data, 8), 8)))
	case 9:
		if depth >= 3 {
			return nil
		}
		return []any{value(data, depth+1), value(data, depth+1)}
	default:
		return len(*data)%2 == 0
	}
}

func take(data *[]byte, n int) []byte {
	n = min(n, len(*data))
	out := (*data)[:n:n]
	*data = (*data)[n:]
	return out
}

func pad(b []byte, n int) []byte {
	if len(b) >= n {
		return b
	}
	return append(make([]byte, n-len(b)), b...)
}
