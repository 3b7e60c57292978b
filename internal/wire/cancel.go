package wire

import (
	"encoding/json"
	"fmt"
	"time"
)

// CancelExchange is the fanout exchange (RabbitMQ) on which a producer
// tells every worker that some of its requests are no longer wanted: the
// Batch API's gateway, when a batch is cancelled, so that its lines still
// in the queue are taken out of it without reaching an engine.
const CancelExchange = "sous.cancel"

// ReasonCancelled is the code of the error result of a request whose
// producer cancelled it before it reached the engine. The request is
// acked, not dead-lettered: nothing went wrong with it.
const ReasonCancelled = "cancelled"

// Cancel says that the requests whose correlation id starts with Prefix
// are cancelled, until Until (after it no such request can still be
// queued: the batch's deadline).
type Cancel struct {
	Prefix string    `json:"prefix"`
	Until  time.Time `json:"until"`
}

// minCancelPrefix keeps a cancel from matching every request.
const minCancelPrefix = 8

// DecodeCancel reads a Cancel and checks it.
func DecodeCancel(b []byte) (Cancel, error) {
	var c Cancel
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("cancel: %w", err)
	}
	if len(c.Prefix) < minCancelPrefix || len(c.Prefix) > 256 || c.Until.IsZero() {
		return c, fmt.Errorf("cancel: a prefix of %d to 256 bytes and until are required", minCancelPrefix)
	}
	return c, nil
}
