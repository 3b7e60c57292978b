package sizing_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sous-run/sous/internal/sizing"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const gib = int64(1) << 30

// fakeSource is a MemorySource whose readings the test sets.
type fakeSource struct {
	mu    sync.Mutex
	free  []uint64
	err   error
	calls int
}

func newSource(free ...int64) *fakeSource {
	f := &fakeSource{}
	f.set(nil, free...)
	return f
}

func (f *fakeSource) FreeBytes(context.Context) ([]uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	return slices.Clone(f.free), f.err
}

func (f *fakeSource) set(err error, free ...int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.free = f.free[:0]
	for _, b := range free {
		f.free = append(f.free, uint64(b))
	}
	f.err = err
}

func (f *fakeSource) Calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// setup builds a Sizer and, when it has a source, takes one reading.
func setup(t *testing.T, src sizing.MemorySource, cfg sizing.Config) *sizing.Sizer {
	t.Helper()
	s, err := sizing.New(src, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := s.Refresh(t.Context()); err != nil {
		t.Fatalf("Refresh: %v", err)
	}
	return s
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestSize(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		free []int64 // nil: no memory source
		cfg  sizing.Config
		want sizing.Decision
	}{
		{name: "memory", free: []int64{20 * gib}, cfg: sizing.Config{ReserveBytes: 4 * gib, BytesPerItem: gib},
			want: sizing.Decision{Size: 16, Reason: sizing.ReasonMemory}},
		{name: "memory rounds down", free: []int64{20*gib + gib/2}, cfg: sizing.Config{ReserveBytes: 4 * gib, BytesPerItem: gib},
			want: sizing.Decision{Size: 16, Reason: sizing.ReasonMemory}},
		{name: "fullest of several devices", free: []int64{40 * gib, 18 * gib, 60 * gib}, cfg: sizing.Config{ReserveBytes: 2 * gib, BytesPerItem: gib},
			want: sizing.Decision{Size: 16, Reason: sizing.ReasonMemory}},
		{name: "max", free: []int64{80 * gib}, cfg: sizing.Config{BytesPerItem: gib},
			want: sizing.Decision{Size: 32, Reason: sizing.ReasonMax}},
		{name: "configured max", free: []int64{80 * gib}, cfg: sizing.Config{Max: 8, BytesPerItem: gib},
			want: sizing.Decision{Size: 8, Reason: sizing.ReasonMax}},
		{name: "memory exactly max", free: []int64{32 * gib}, cfg: sizing.Config{BytesPerItem: gib},
			want: sizing.Decision{Size: 32, Reason: sizing.ReasonMax}},
		{name: "free below reserve", free: []int64{3 * gib}, cfg: sizing.Config{ReserveBytes: 4 * gib, BytesPerItem: gib},
			want: sizing.Decision{Size: 1, Reason: sizing.ReasonMin}},
		{name: "no free memory", free: []int64{0}, cfg: sizing.Config{BytesPerItem: gib},
			want: sizing.Decision{Size: 1, Reason: sizing.ReasonMin}},
		{name: "configured min", free: []int64{6 * gib}, cfg: sizing.Config{Min: 4, ReserveBytes: 4 * gib, BytesPerItem: gib},
			want: sizing.Decision{Size: 4, Reason: sizing.ReasonMin}},
		{name: "engine", free: []int64{80 * gib}, cfg: sizing.Config{BytesPerItem: gib, EngineParallel: 4},
			want: sizing.Decision{Size: 4, Reason: sizing.ReasonEngine}},
		{name: "engine above memory", free: []int64{10 * gib}, cfg: sizing.Config{BytesPerItem: gib, EngineParallel: 12},
			want: sizing.Decision{Size: 10, Reason: sizing.ReasonMemory}},
		{name: "engine equal to memory names memory", free: []int64{12 * gib}, cfg: sizing.Config{BytesPerItem: gib, EngineParallel: 12},
			want: sizing.Decision{Size: 12, Reason: sizing.ReasonMemory}},
		{name: "engine above max", free: []int64{80 * gib}, cfg: sizing.Config{BytesPerItem: gib, EngineParallel: 64},
			want: sizing.Decision{Size: 32, Reason: sizing.ReasonMax}},
		{name: "no source", cfg: sizing.Config{BytesPerItem: gib},
			want: sizing.Decision{Size: 32, Reason: sizing.ReasonConfig}},
		{name: "no source, configured max", cfg: sizing.Config{Max: 16},
			want: sizing.Decision{Size: 16, Reason: sizing.ReasonConfig}},
		{name: "no source, engine", cfg: sizing.Config{EngineParallel: 8},
			want: sizing.Decision{Size: 8, Reason: sizing.ReasonEngine}},
		{name: "no per-item estimate", free: []int64{gib}, cfg: sizing.Config{},
			want: sizing.Decision{Size: 32, Reason: sizing.ReasonConfig}},
		{name: "per item from kv cache", free: []int64{8 * gib}, cfg: sizing.Config{ContextLength: 4096, KVBytesPerToken: 128 << 10},
			want: sizing.Decision{Size: 16, Reason: sizing.ReasonMemory}},
		{name: "explicit per item beats kv cache", free: []int64{8 * gib}, cfg: sizing.Config{BytesPerItem: gib, ContextLength: 4096, KVBytesPerToken: 128 << 10},
			want: sizing.Decision{Size: 8, Reason: sizing.ReasonMemory}},
		{name: "context length alone is no estimate", free: []int64{gib}, cfg: sizing.Config{ContextLength: 4096},
			want: sizing.Decision{Size: 32, Reason: sizing.ReasonConfig}},
		{name: "huge free memory", free: []int64{math.MaxInt64}, cfg: sizing.Config{BytesPerItem: 1},
			want: sizing.Decision{Size: 32, Reason: sizing.ReasonMax}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var src sizing.MemorySource
			if tt.free != nil {
				src = newSource(tt.free...)
			}
			s := setup(t, src, tt.cfg)
			if got := s.Size(); got != tt.want {
				t.Errorf("Size() = %+v, want %+v", got, tt.want)
			}
			snap := s.Snapshot()
			if wantCeil := tt.cfg.WithDefaults().Max; snap.Decision != tt.want || snap.Ceiling != wantCeil {
				t.Errorf("Snapshot() = %+v, want %+v, ceiling %d", snap, tt.want, wantCeil)
			}
			if tt.free != nil && snap.FreeBytes != uint64(slices.Min(tt.free)) {
				t.Errorf("Snapshot().FreeBytes = %d, want %d", snap.FreeBytes, slices.Min(tt.free))
			}
		})
	}
}

func TestBeforeFirstReading(t *testing.T) {
	t.Parallel()
	src := newSource()
	src.set(errors.New("nvml: GPU is lost"))
	s, err := sizing.New(src, sizing.Config{BytesPerItem: gib, EngineParallel: 8})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Refresh(t.Context()); err == nil {
		t.Error("Refresh: no error, want the source's")
	}
	if got, want := s.Size(), (sizing.Decision{Size: 8, Reason: sizing.ReasonEngine}); got != want {
		t.Errorf("Size() = %+v, want %+v", got, want)
	}
	if snap := s.Snapshot(); !snap.ReadAt.IsZero() || snap.Devices != 0 {
		t.Errorf("Snapshot() = %+v, want no reading", snap)
	}
}

func TestConfigValidation(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		cfg  sizing.Config
		want string // part of the error; empty: valid
	}{
		{name: "zero value", cfg: sizing.Config{}},
		{name: "min only", cfg: sizing.Config{Min: 8}},
		{name: "engine equal to min", cfg: sizing.Config{Min: 4, EngineParallel: 4}},
		{name: "negative min", cfg: sizing.Config{Min: -1}, want: "SOUS_BATCH_MIN"},
		{name: "max below min", cfg: sizing.Config{Min: 8, Max: 4}, want: "SOUS_BATCH_MAX"},
		{name: "min above default max", cfg: sizing.Config{Min: 64}, want: "SOUS_BATCH_MAX"},
		{name: "negative max", cfg: sizing.Config{Max: -1}, want: "SOUS_BATCH_MAX"},
		{name: "huge max", cfg: sizing.Config{Max: math.MaxInt32 + 1}, want: "SOUS_BATCH_MAX"},
		{name: "negative reserve", cfg: sizing.Config{ReserveBytes: -1}, want: "SOUS_GPU_RESERVE_BYTES"},
		{name: "negative per item", cfg: sizing.Config{BytesPerItem: -1}, want: "SOUS_BATCH_ITEM_BYTES"},
		{name: "negative context", cfg: sizing.Config{ContextLength: -1}, want: "SOUS_MODEL_CONTEXT_LENGTH"},
		{name: "negative kv", cfg: sizing.Config{KVBytesPerToken: -1}, want: "SOUS_KV_BYTES_PER_TOKEN"},
		{name: "negative engine", cfg: sizing.Config{EngineParallel: -1}, want: "SOUS_ENGINE_PARALLEL"},
		{name: "engine below min", cfg: sizing.Config{Min: 4, EngineParallel: 2}, want: "SOUS_ENGINE_PARALLEL"},
		{name: "negative growth", cfg: sizing.Config{GrowthStep: -1}, want: "SOUS_BATCH_GROWTH_STEP"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := sizing.New(nil, tt.cfg)
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("New: %v, want no error", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("New: %v, want an error naming %s", err, tt.want)
			}
		})
	}
}

func TestDefaults(t *testing.T) {
	t.Parallel()
	cfg := sizing.Config{}.WithDefaults()
	if cfg.Min != 1 || cfg.Max != 32 || cfg.GrowthStep != 1 || cfg.Logger == nil || cfg.Now == nil {
		t.Errorf("WithDefaults() = %+v", cfg)
	}
	s := setup(t, nil, sizing.Config{})
	if got := s.Snapshot(); got.Size != 32 || got.Reason != sizing.ReasonConfig || got.Ceiling != 32 {
		t.Errorf("Snapshot() = %+v, want size 32 from config, ceiling 32", got)
	}
}

func TestPerItemFromKV(t *testing.T) {
	t.Parallel()
	tests := []struct {
		ctxLen, kv int
		want       int64
	}{
		{ctxLen: 4096, kv: 128 << 10, want: 512 << 20},
		{ctxLen: 8192, kv: 512 << 10, want: 4 << 30}, // Llama 2 7B, fp16
		{ctxLen: 0, kv: 128 << 10, want: 0},
		{ctxLen: 4096, kv: 0, want: 0},
		{ctxLen: -1, kv: 1, want: 0},
		{ctxLen: math.MaxInt, kv: math.MaxInt, want: math.MaxInt64},
	}
	for _, tt := range tests {
		if got := sizing.PerItemFromKV(tt.ctxLen, tt.kv); got != tt.want {
			t.Errorf("PerItemFromKV(%d, %d) = %d, want %d", tt.ctxLen, tt.kv, got, tt.want)
		}
	}
}

func TestAIMD(t *testing.T) {
	t.Parallel()
	type step struct {
		op         string // "overloaded" or "succeeded"
		n          int
		wantCeil   int
		wantSize   int
		wantReason string
	}
	tests := []struct {
		name  string
		free  []int64 // nil: no memory source
		cfg   sizing.Config
		steps []step
	}{
		{
			name: "halve and grow back",
			cfg:  sizing.Config{Min: 2, Max: 32},
			steps: []step{
				{"overloaded", 32, 16, 16, sizing.ReasonCeiling},
				{"overloaded", 32, 16, 16, sizing.ReasonCeiling}, // sent before the cut: counts once
				{"overloaded", 16, 8, 8, sizing.ReasonCeiling},
				{"succeeded", 4, 8, 8, sizing.ReasonCeiling}, // below the ceiling: proves nothing
				{"succeeded", 8, 9, 9, sizing.ReasonCeiling},
				{"succeeded", 9, 10, 10, sizing.ReasonCeiling},
				{"overloaded", 0, 5, 5, sizing.ReasonCeiling}, // size unknown: halve the current one
				{"overloaded", 5, 2, 2, sizing.ReasonCeiling},
				{"overloaded", 2, 2, 2, sizing.ReasonCeiling}, // never below Min
				{"succeeded", 2, 3, 3, sizing.ReasonCeiling},
			},
		},
		{
			name: "growth step",
			cfg:  sizing.Config{Max: 32, GrowthStep: 4},
			steps: []step{
				{"overloaded", 32, 16, 16, sizing.ReasonCeiling},
				{"succeeded", 16, 20, 20, sizing.ReasonCeiling},
				{"succeeded", 20, 24, 24, sizing.ReasonCeiling},
				{"succeeded", 24, 28, 28, sizing.ReasonCeiling},
				{"succeeded", 28, 32, 32, sizing.ReasonConfig},
				{"succeeded", 32, 32, 32, sizing.ReasonConfig}, // up to Max, no further
			},
		},
		{
			name: "overload while memory sets the size",
			free: []int64{10 * gib},
			cfg:  sizing.Config{BytesPerItem: gib},
			steps: []step{
				{"succeeded", 10, 32, 10, sizing.ReasonMemory},
				{"overloaded", 10, 5, 5, sizing.ReasonCeiling},
				{"succeeded", 5, 6, 6, sizing.ReasonCeiling},
			},
		},
		{
			name: "engine cap",
			cfg:  sizing.Config{EngineParallel: 4},
			steps: []step{
				{"overloaded", 4, 2, 2, sizing.ReasonCeiling},
				{"succeeded", 2, 3, 3, sizing.ReasonCeiling},
				{"succeeded", 3, 4, 4, sizing.ReasonCeiling}, // a tie names the earlier limit
				{"succeeded", 4, 5, 4, sizing.ReasonEngine},
				{"succeeded", 4, 5, 4, sizing.ReasonEngine}, // below the ceiling now: no growth
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var src sizing.MemorySource
			if tt.free != nil {
				src = newSource(tt.free...)
			}
			s := setup(t, src, tt.cfg)
			for i, st := range tt.steps {
				switch st.op {
				case "overloaded":
					s.Overloaded(st.n)
				case "succeeded":
					s.Succeeded(st.n)
				}
				snap := s.Snapshot()
				want := sizing.Decision{Size: st.wantSize, Reason: st.wantReason}
				if snap.Ceiling != st.wantCeil || snap.Decision != want || s.Size() != want {
					t.Fatalf("step %d, %s(%d): ceiling %d, size %+v; want ceiling %d, size %+v",
						i, st.op, st.n, snap.Ceiling, snap.Decision, st.wantCeil, want)
				}
			}
		})
	}
}

func TestAIMDRecoversToMax(t *testing.T) {
	t.Parallel()
	s := setup(t, nil, sizing.Config{})
	for range 10 {
		s.Overloaded(0)
	}
	if got := s.Size(); got.Size != 1 {
		t.Fatalf("after ten overloads Size() = %+v, want 1", got)
	}
	batches := 0
	for s.Size().Size < 32 {
		s.Succeeded(s.Size().Size)
		batches++
		if batches > 100 {
			t.Fatalf("ceiling stuck at %d", s.Snapshot().Ceiling)
		}
	}
	if batches != 31 {
		t.Errorf("recovered from 1 to 32 in %d full batches, want 31 (additive increase by 1)", batches)
	}
}

// TestReadingsNotPerSize checks that Size never reads memory: readings come
// from Refresh only.
func TestReadingsNotPerSize(t *testing.T) {
	t.Parallel()
	src := newSource(20 * gib)
	s, err := sizing.New(src, sizing.Config{BytesPerItem: gib})
	if err != nil {
		t.Fatal(err)
	}
	for range 1000 {
		s.Size()
	}
	if got := src.Calls(); got != 0 {
		t.Fatalf("1000 Size calls read memory %d times, want 0", got)
	}
	if err := s.Refresh(t.Context()); err != nil {
		t.Fatal(err)
	}
	for range 1000 {
		s.Size()
	}
	if got := src.Calls(); got != 1 {
		t.Errorf("one Refresh and 1000 Size calls read memory %d times, want 1", got)
	}
	if got := s.Size(); got.Size != 20 {
		t.Errorf("Size() = %+v, want 20 from the reading", got)
	}
}

func TestRefreshFailureKeepsReading(t *testing.T) {
	t.Parallel()
	clock := newClock()
	src := newSource(20*gib, 30*gib)
	s := setup(t, src, sizing.Config{BytesPerItem: gib, Now: clock.Now})
	before := s.Snapshot()
	want := sizing.Decision{Size: 20, Reason: sizing.ReasonMemory}
	if before.Decision != want || !before.ReadAt.Equal(clock.Now()) || before.Devices != 2 {
		t.Fatalf("Snapshot() = %+v, want %+v read now from 2 devices", before, want)
	}
	lost := errors.New("GPU 1: read memory: ERROR_GPU_IS_LOST")
	for _, bad := range []struct {
		name string
		free []int64
		err  error
	}{
		{name: "error", err: lost},
		// One device read and one not: the unread one may be the fullest.
		{name: "partial", free: []int64{70 * gib}, err: lost},
		{name: "no devices", free: nil, err: nil},
	} {
		clock.Advance(time.Second)
		src.set(bad.err, bad.free...)
		err := s.Refresh(t.Context())
		if err == nil {
			t.Errorf("%s: Refresh returned no error", bad.name)
		}
		if bad.err != nil && !errors.Is(err, bad.err) {
			t.Errorf("%s: Refresh error %v, want it to wrap %v", bad.name, err, bad.err)
		}
		if got := s.Snapshot(); got != before {
			t.Errorf("%s: Snapshot() = %+v, want the previous %+v", bad.name, got, before)
		}
	}
	clock.Advance(time.Second)
	src.set(nil, 5*gib, 30*gib)
	if err := s.Refresh(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := s.Snapshot(); got.Size != 5 || got.FreeBytes != uint64(5*gib) || !got.ReadAt.Equal(clock.Now()) {
		t.Errorf("after recovery Snapshot() = %+v, want size 5 read now", got)
	}
}

// syncBuffer is a bytes.Buffer safe for the logger and the test to share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// lines returns the decoded JSON log lines.
func (b *syncBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	for line := range strings.SplitSeq(strings.TrimSpace(b.buf.String()), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

func (b *syncBuffer) count(t *testing.T, msg string) int {
	t.Helper()
	n := 0
	for _, l := range b.lines(t) {
		if l["msg"] == msg {
			n++
		}
	}
	return n
}

func TestRun(t *testing.T) {
	t.Parallel()
	src := newSource(20 * gib)
	logs := &syncBuffer{}
	s, err := sizing.New(src, sizing.Config{
		BytesPerItem: gib,
		Logger:       slog.New(slog.NewJSONHandler(logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, time.Millisecond) }()

	waitFor(t, "the first reading", func() bool { return s.Size().Size == 20 })
	src.set(nil, 8*gib)
	waitFor(t, "the second reading", func() bool { return s.Size().Size == 8 })

	src.set(errors.New("nvml: unknown error"))
	calls := src.Calls()
	waitFor(t, "several failed readings", func() bool { return src.Calls() >= calls+5 })
	if got := logs.count(t, "gpu memory reading failed; keeping the last reading"); got != 1 {
		t.Errorf("logged %d failures for one failing spell, want 1", got)
	}
	if got := s.Size().Size; got != 8 {
		t.Errorf("Size() while readings fail = %d, want the last good 8", got)
	}

	src.set(nil, 12*gib)
	waitFor(t, "the recovered reading", func() bool { return s.Size().Size == 12 })
	waitFor(t, "the recovery log", func() bool { return logs.count(t, "gpu memory reading recovered") == 1 })

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v, want nil after cancel", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

func TestRunArguments(t *testing.T) {
	t.Parallel()
	s := setup(t, newSource(gib), sizing.Config{})
	if err := s.Run(t.Context(), 0); err == nil {
		t.Error("Run with interval 0: no error")
	}
	noGPU := setup(t, nil, sizing.Config{})
	if err := noGPU.Run(t.Context(), time.Second); err != nil {
		t.Errorf("Run without a source: %v, want nil at once", err)
	}
}

func TestChangeNotifications(t *testing.T) {
	t.Parallel()
	clock := newClock()
	logs := &syncBuffer{}
	var (
		mu   sync.Mutex
		seen []sizing.Snapshot
	)
	src := newSource(20 * gib)
	s, err := sizing.New(src, sizing.Config{
		BytesPerItem: gib,
		Logger:       slog.New(slog.NewJSONHandler(logs, nil)),
		Now:          clock.Now,
		OnChange: func(snap sizing.Snapshot) {
			mu.Lock()
			defer mu.Unlock()
			seen = append(seen, snap)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	clock.Advance(time.Second)
	_ = s.Refresh(ctx) // config 32 -> memory 20
	_ = s.Refresh(ctx) // unchanged: no notification
	clock.Advance(time.Second)
	s.Overloaded(20) // ceiling 10
	s.Succeeded(3)   // unchanged
	clock.Advance(time.Second)
	src.set(nil, 4*gib)
	_ = s.Refresh(ctx) // memory 4

	want := []struct {
		d       sizing.Decision
		ceiling int
		at      time.Duration
	}{
		{sizing.Decision{Size: 20, Reason: sizing.ReasonMemory}, 32, time.Second},
		{sizing.Decision{Size: 10, Reason: sizing.ReasonCeiling}, 10, 2 * time.Second},
		{sizing.Decision{Size: 4, Reason: sizing.ReasonMemory}, 10, 3 * time.Second},
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != len(want) {
		t.Fatalf("OnChange called %d times, want %d: %+v", len(seen), len(want), seen)
	}
	start := newClock().Now()
	for i, w := range want {
		if seen[i].Decision != w.d || seen[i].Ceiling != w.ceiling || !seen[i].ChangedAt.Equal(start.Add(w.at)) {
			t.Errorf("change %d: %+v, want %+v ceiling %d at +%v", i, seen[i], w.d, w.ceiling, w.at)
		}
	}

	var changes []map[string]any
	for _, l := range logs.lines(t) {
		if l["msg"] == "in-flight limit changed" {
			changes = append(changes, l)
		}
	}
	if len(changes) != len(want) {
		t.Fatalf("logged %d changes, want %d", len(changes), len(want))
	}
	last := changes[len(changes)-1]
	for key, v := range map[string]float64{"in_flight_limit": 4, "free_bytes": float64(4 * gib), "ceiling": 10} {
		if last[key] != v {
			t.Errorf("log %q = %v, want %v", key, last[key], v)
		}
	}
	if last["reason"] != sizing.ReasonMemory {
		t.Errorf("log reason = %v, want memory", last["reason"])
	}
}

func TestConcurrentUse(t *testing.T) {
	t.Parallel()
	src := newSource(20 * gib)
	cfg := sizing.Config{Min: 2, Max: 24, BytesPerItem: gib, EngineParallel: 16}
	s := setup(t, src, cfg)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 2000 {
				d := s.Size()
				if d.Size < cfg.Min || d.Size > cfg.EngineParallel || d.Reason == "" {
					t.Errorf("Size() = %+v, outside [%d, %d]", d, cfg.Min, cfg.EngineParallel)
					return
				}
				switch {
				case g == 0 && i%50 == 0:
					src.set(nil, int64(i%30)*gib)
					_ = s.Refresh(t.Context())
				case g == 1 && i%100 == 0:
					s.Overloaded(d.Size)
				case g == 2:
					s.Succeeded(d.Size)
				case g == 3 && i%10 == 0:
					_ = s.Snapshot()
				}
			}
		})
	}
	wg.Wait()
}

// TestSizeDoesNotAllocate is not parallel: AllocsPerRun counts the whole
// process's allocations.
func TestSizeDoesNotAllocate(t *testing.T) {
	s := setup(t, newSource(20*gib), sizing.Config{BytesPerItem: gib})
	if allocs := testing.AllocsPerRun(1000, func() { _ = s.Size() }); allocs != 0 {
		t.Errorf("Size allocates %v times per call, want 0", allocs)
	}
}

// BenchmarkSize measures the hot path: Size alone, from many goroutines,
// and while batches report back. Snapshot, which takes the lock, is there
// for comparison.
func BenchmarkSize(b *testing.B) {
	newSizer := func(b *testing.B) *sizing.Sizer {
		s, err := sizing.New(newSource(20*gib), sizing.Config{BytesPerItem: gib})
		if err != nil {
			b.Fatal(err)
		}
		if err := s.Refresh(context.Background()); err != nil {
			b.Fatal(err)
		}
		return s
	}
	b.Run("serial", func(b *testing.B) {
		s := newSizer(b)
		b.ReportAllocs()
		for b.Loop() {
			_ = s.Size()
		}
	})
	b.Run("parallel", func(b *testing.B) {
		s := newSizer(b)
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				_ = s.Size()
			}
		})
	})
	b.Run("parallel_with_feedback", func(b *testing.B) {
		s := newSizer(b)
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				d := s.Size()
				if i++; i%32 == 0 {
					s.Succeeded(d.Size)
				}
			}
		})
	})
	b.Run("snapshot_parallel", func(b *testing.B) {
		s := newSizer(b)
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				_ = s.Snapshot()
			}
		})
	})
}

func ExampleSizer() {
	// Free memory of two devices; in production a *gpu.Reader.
	free := []uint64{40 << 30, 24 << 30}
	src := sizing.MemorySourceFunc(func(context.Context) ([]uint64, error) { return free, nil })

	s, err := sizing.New(src, sizing.Config{
		Max:          32,
		ReserveBytes: 8 << 30,
		BytesPerItem: sizing.PerItemFromKV(8192, 128<<10), // 1 GiB per item
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	// The owner runs s.Run(ctx, 2*time.Second) in a goroutine it waits
	// for; here one reading will do.
	if err := s.Refresh(context.Background()); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(s.Size())

	s.Overloaded(16) // the engine answered 429 to a batch of 16
	fmt.Println(s.Size())

	s.Succeeded(8) // a batch at the ceiling went through
	fmt.Println(s.Size())
	// Output:
	// {16 memory}
	// {8 ceiling}
	// {9 ceiling}
}
