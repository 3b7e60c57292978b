package bench

import (
	"fmt"
	"testing"
	"time"
)

// benchSlots compares, on a fresh stand-in engine each, a plain client that
// keeps slots requests in flight against the engine directly (no broker:
// the most the engine can do) with sous at its defaults and
// SOUS_ENGINE_PARALLEL=slots, through the local RabbitMQ. sous reports
// its ratio to the plain client (xplain-client). Both report how full the
// engine's slots were over the timed run (slot-util).
func benchSlots(b *testing.B, work workload, newEngine func() *slotEngine) {
	var plain baseline
	b.Run("design=plain-client", func(b *testing.B) {
		eng := newEngine()
		eng.startRun()
		b.ResetTimer()
		runDirect(b, eng, "tiny", work, eng.slots, b.N)
		b.StopTimer()
		plain.set(b, perSecond(b))
		eng.report(b)
	})
	b.Run("design=sous", func(b *testing.B) {
		eng := newEngine()
		e := setup(b, "tiny", work)
		e.fill(b.N)
		eng.startRun()
		b.ResetTimer()
		e.runSous(eng, eng.slots, b.N)
		b.StopTimer()
		plain.ratio(b, perSecond(b), "xplain-client")
		eng.report(b)
	})
}

// BenchmarkMixedLengths: answers of very different lengths on an engine
// that batches continuously, with 32 slots: 9 requests in 10 ask for 16
// tokens, 1 in 10 for 512; a request takes 20 ms + 0.5 ms per request
// running + 1 ms per token. Target: sous ≥ 0.95 of the plain client.
func BenchmarkMixedLengths(b *testing.B) {
	const slots = 32
	benchSlots(b, mixed(16, 512), func() *slotEngine {
		return newSlotEngine(slots, 20*time.Millisecond, 500*time.Microsecond, time.Millisecond)
	})
}

// BenchmarkUniform: every request the same, on 32 slots: 50 ms + 2 ms per
// request running. Target: sous ≥ 0.95 of the plain client.
func BenchmarkUniform(b *testing.B) {
	const slots = 32
	benchSlots(b, uniform(4), func() *slotEngine {
		return newSlotEngine(slots, 50*time.Millisecond, 2*time.Millisecond, 0)
	})
}

// BenchmarkBatching: an engine whose API takes a list (as /v1/completions
// prompt lists and /api/embed do), simulated: one call at a time on the
// device, a call of n requests takes 50 ms + 2 ms × n, at most 32 (more is
// an out-of-memory error). sous at its defaults with
// SOUS_ENGINE_PARALLEL=32 against the ideal, full calls back to back:
// 32 / (50 ms + 64 ms) requests per second.
func BenchmarkBatching(b *testing.B) {
	const fixed, perItem, size = 50 * time.Millisecond, 2 * time.Millisecond, 32
	ideal := float64(size) / (fixed + perItem*size).Seconds()
	b.Run(fmt.Sprintf("design=sous/slots=%d", size), func(b *testing.B) {
		work := uniform(4)
		e := setup(b, "tiny", work)
		e.fill(b.N)
		g := &gpuSim{fixed: fixed, perItem: perItem, max: size}
		b.ResetTimer()
		e.runSous(g, size, b.N)
		b.ReportMetric(perSecond(b)/ideal, "xideal")
		b.ReportMetric(ideal, "ideal-msgs/s")
		if c := g.calls.Load(); c > 0 {
			b.ReportMetric(float64(g.items.Load())/float64(c), "items/call")
		}
	})
}
