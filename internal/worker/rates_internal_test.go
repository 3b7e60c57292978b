package worker

import (
	"math"
	"testing"
	"time"
)

// A lane's rates follow its steady completions, and a burst of short
// answers does not make it look fast.
func TestMeter(t *testing.T) {
	var m meter
	now := time.Unix(1000, 0)
	for range 600 { // one completion a second, 2 s on the engine, 10 tokens
		now = now.Add(time.Second)
		m.observe(now, 2*time.Second, 10)
	}
	served, tokens, service := m.read(now)
	if math.Abs(served-1) > 0.05 || math.Abs(tokens-10) > 0.5 || math.Abs(service-2) > 0.01 {
		t.Fatalf("steady: served %.3f/s tokens %.2f/s service %.3fs, want 1, 10, 2", served, tokens, service)
	}
	for range 100 { // a burst of short answers within one second
		now = now.Add(10 * time.Millisecond)
		m.observe(now, 100*time.Millisecond, 1)
	}
	if _, _, service := m.read(now); service < 1.5 {
		t.Fatalf("after a one-second burst of short answers the mean service time is %.3fs, want it still near 2s", service)
	}
	// An idle lane's rates decay; its service time is kept (the scaler
	// prices the next burst with it).
	served, _, service = m.read(now.Add(10 * time.Minute))
	if served > 0.01 || service < 1.5 {
		t.Fatalf("after 10 idle minutes: served %.4f/s, service %.3fs", served, service)
	}
	var empty meter
	if s, tk, svc := empty.read(now); s != 0 || tk != 0 || svc != 0 {
		t.Fatal("a lane with no completion reports rates")
	}
}
