package rabbitmq

import (
	"maps"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
)

// A recycled header table holds exactly the next publish's headers: keys it
// no longer has are gone, changed values are new, and what repeats stays.
func TestRecycledTables(t *testing.T) {
	t.Parallel()
	var s session
	for i, h := range []map[string]string{
		{"x-sous-status": "ok", "traceparent": "00-a"},
		{"x-sous-status": "ok"},
		{"x-sous-status": "error", "x-other": "1"},
		{"x-other": "1"},
		{"x-sous-status": "ok", "traceparent": "00-b"},
	} {
		tab := s.table(h)
		want := amqp.Table{}
		for k, v := range h {
			want[k] = v
		}
		if !maps.Equal(tab, want) {
			t.Fatalf("publish %d: table %v, want %v", i, tab, want)
		}
		if err := tab.Validate(); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		s.tables.Put(tab)
	}
}
