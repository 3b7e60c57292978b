package sizing

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Reasons name the limit that set a Decision's size.
const (
	// ReasonMemory: free memory, less the reserve, fits this many items.
	ReasonMemory = "memory"
	// ReasonMax: memory fits Max items or more; Max applies.
	ReasonMax = "max"
	// ReasonMin: memory fits fewer than Min items; Min applies anyway.
	ReasonMin = "min"
	// ReasonConfig: no memory reading or no per-item estimate; Max applies.
	ReasonConfig = "config"
	// ReasonCeiling: the AIMD ceiling, lowered after the engine was
	// overloaded, is below the other limits.
	ReasonCeiling = "ceiling"
	// ReasonEngine: the engine's parallelism is below the other limits.
	ReasonEngine = "engine"
)

// Reasons are every reason a Decision gives, for the docs and metric help
// that list them (a test compares).
var Reasons = []string{ReasonMemory, ReasonMax, ReasonMin, ReasonConfig, ReasonCeiling, ReasonEngine}

// Decision is a batch size and the limit that set it.
type Decision struct {
	// Size is the number of items in the next batch, between Config.Min
	// and Config.Max.
	Size int
	// Reason is one of the Reason constants. Limits apply in the order
	// memory (or max, min, config), ceiling, engine, and a later one is named
	// only when it is strictly smaller, so a tie names the earlier limit.
	Reason string
}

// MemorySource reports free device memory. *gpu.Reader satisfies it.
type MemorySource interface {
	// FreeBytes returns the free memory, in bytes, of each device a batch
	// runs on. A non-nil error means at least one device could not be read;
	// the Sizer then discards the whole reading, because the device it
	// could not see may be the fullest.
	FreeBytes(ctx context.Context) ([]uint64, error)
}

// MemorySourceFunc adapts a function to MemorySource.
type MemorySourceFunc func(ctx context.Context) ([]uint64, error)

// FreeBytes calls f.
func (f MemorySourceFunc) FreeBytes(ctx context.Context) ([]uint64, error) { return f(ctx) }

// Config configures a Sizer. Only cmd/worker reads the environment; the
// variables named here are where it takes each field from.
type Config struct {
	// Min is the smallest batch, even when memory is short
	// (SOUS_BATCH_MIN, default 1).
	Min int
	// Max is the largest batch (SOUS_BATCH_MAX, default 32).
	Max int
	// ReserveBytes is device memory, in bytes, never counted as room for
	// items (SOUS_GPU_RESERVE_BYTES, default 0).
	ReserveBytes int64
	// BytesPerItem is the device memory, in bytes, one item needs
	// (SOUS_BATCH_ITEM_BYTES). Zero derives it from ContextLength and
	// KVBytesPerToken; when those are unset too, memory does not limit the
	// size.
	BytesPerItem int64
	// ContextLength is the model's context length in tokens
	// (SOUS_MODEL_CONTEXT_LENGTH, or as the engine reports it).
	ContextLength int
	// KVBytesPerToken is the model's KV-cache size per token, in bytes
	// (SOUS_KV_BYTES_PER_TOKEN, or as the engine reports it).
	KVBytesPerToken int
	// EngineParallel is how many requests the engine runs at once, such as
	// Ollama's OLLAMA_NUM_PARALLEL (SOUS_ENGINE_PARALLEL, default 0: no cap).
	EngineParallel int
	// GrowthStep is how much the ceiling grows per batch that succeeds at
	// the ceiling (SOUS_BATCH_GROWTH_STEP, default 1).
	GrowthStep int

	// Logger receives a line each time the decision changes and when
	// readings start or stop failing. Nil discards.
	Logger *slog.Logger
	// OnChange, if set, is called with the new state each time the
	// decision changes, in order, one call at a time. It must return
	// quickly and must not call Refresh, Overloaded or Succeeded.
	OnChange func(Snapshot)
	// Now is the clock. Nil means time.Now.
	Now func() time.Time
}

// WithDefaults returns c with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.Min == 0 {
		c.Min = 1
	}
	if c.Max == 0 {
		c.Max = 32
	}
	if c.GrowthStep == 0 {
		c.GrowthStep = 1
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

// validate checks a Config that has its defaults.
func (c Config) validate() error {
	switch {
	case c.Min < 1:
		return fmt.Errorf("sizing: SOUS_BATCH_MIN is %d, want at least 1", c.Min)
	case c.Max < c.Min:
		return fmt.Errorf("sizing: SOUS_BATCH_MAX (%d) is below SOUS_BATCH_MIN (%d)", c.Max, c.Min)
	case c.Max > math.MaxInt32:
		return fmt.Errorf("sizing: SOUS_BATCH_MAX is %d, want at most %d", c.Max, math.MaxInt32)
	case c.ReserveBytes < 0:
		return fmt.Errorf("sizing: SOUS_GPU_RESERVE_BYTES is %d, want 0 or more", c.ReserveBytes)
	case c.BytesPerItem < 0:
		return fmt.Errorf("sizing: SOUS_BATCH_ITEM_BYTES is %d, want 0 or more", c.BytesPerItem)
	case c.ContextLength < 0:
		return fmt.Errorf("sizing: SOUS_MODEL_CONTEXT_LENGTH is %d, want 0 or more", c.ContextLength)
	case c.KVBytesPerToken < 0:
		return fmt.Errorf("sizing: SOUS_KV_BYTES_PER_TOKEN is %d, want 0 or more", c.KVBytesPerToken)
	case c.EngineParallel < 0:
		return fmt.Errorf("sizing: SOUS_ENGINE_PARALLEL is %d, want 0 (no cap) or more", c.EngineParallel)
	case c.EngineParallel > 0 && c.EngineParallel < c.Min:
		return fmt.Errorf("sizing: SOUS_ENGINE_PARALLEL (%d) is below SOUS_BATCH_MIN (%d)", c.EngineParallel, c.Min)
	case c.GrowthStep < 1:
		return fmt.Errorf("sizing: SOUS_BATCH_GROWTH_STEP is %d, want at least 1", c.GrowthStep)
	}
	return nil
}

// PerItemBytes is the per-item estimate in bytes that c implies:
// BytesPerItem when set, else PerItemFromKV(ContextLength,
// KVBytesPerToken). Zero means memory does not limit the size.
func (c Config) PerItemBytes() int64 {
	if c.BytesPerItem > 0 {
		return c.BytesPerItem
	}
	return PerItemFromKV(c.ContextLength, c.KVBytesPerToken)
}

// PerItemFromKV is the KV-cache memory, in bytes, of one item that fills a
// context of ctxLen tokens at kvBytesPerToken bytes per token: the
// worst case for one sequence. It is 0 when either is 0 or less, and
// saturates at math.MaxInt64.
func PerItemFromKV(ctxLen, kvBytesPerToken int) int64 {
	if ctxLen <= 0 || kvBytesPerToken <= 0 {
		return 0
	}
	c, k := int64(ctxLen), int64(kvBytesPerToken)
	if c > math.MaxInt64/k {
		return math.MaxInt64
	}
	return c * k
}

// Snapshot is the Sizer's state, for logs and metrics.
type Snapshot struct {
	Decision
	// Ceiling is the AIMD ceiling, between Min and Max.
	Ceiling int
	// FreeBytes is the free memory, in bytes, of the fullest device at the
	// last good reading; 0 before the first.
	FreeBytes uint64
	// Devices is how many devices the last good reading covered.
	Devices int
	// ReadAt is when the last good reading was taken; zero before the first.
	ReadAt time.Time
	// ChangedAt is when the decision last changed; zero if it never has.
	ChangedAt time.Time
}

// Sizer decides batch sizes. Build one with New.
type Sizer struct {
	cfg     Config
	perItem int64
	src     MemorySource

	decision atomic.Pointer[Decision]

	refreshMu sync.Mutex // serialises calls to src

	mu        sync.Mutex // guards the fields below
	ceiling   int
	hasRead   bool
	free      uint64
	devices   int
	readAt    time.Time
	changedAt time.Time

	// notifyMu keeps change notifications in order. It is taken while mu is
	// held and kept after mu is released, so notifications do not block
	// Size or Snapshot.
	notifyMu sync.Mutex
}

// New returns a Sizer. src may be nil, for a node without NVML: the size
// then comes from cfg alone. Do not pass a nil pointer in a non-nil
// interface (a nil *gpu.Reader): pass a nil src. New fails if cfg, with its
// defaults, is invalid.
func New(src MemorySource, cfg Config) (*Sizer, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &Sizer{cfg: cfg, perItem: cfg.PerItemBytes(), src: src, ceiling: cfg.Max}
	d := s.decideLocked()
	s.decision.Store(&d)
	return s, nil
}

// Size returns the current decision. It reads no memory and does not
// allocate; readings come from Refresh.
func (s *Sizer) Size() Decision {
	return *s.decision.Load()
}

// Snapshot returns the current state.
func (s *Sizer) Snapshot() Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.snapshotLocked()
}

func (s *Sizer) snapshotLocked() Snapshot {
	return Snapshot{
		Decision:  *s.decision.Load(),
		Ceiling:   s.ceiling,
		FreeBytes: s.free,
		Devices:   s.devices,
		ReadAt:    s.readAt,
		ChangedAt: s.changedAt,
	}
}

// Refresh takes one memory reading and updates the decision. The free
// memory used is the minimum over the devices read. On error the previous
// reading stays in force and Refresh returns the error. Without a memory
// source Refresh does nothing.
func (s *Sizer) Refresh(ctx context.Context) error {
	if s.src == nil {
		return nil
	}
	s.refreshMu.Lock()
	defer s.refreshMu.Unlock()
	free, err := s.src.FreeBytes(ctx)
	if err != nil {
		return fmt.Errorf("sizing: read free memory: %w", err)
	}
	if len(free) == 0 {
		return errors.New("sizing: read free memory: no device reported")
	}
	now := s.cfg.Now()
	s.mu.Lock()
	s.hasRead = true
	s.free = slices.Min(free)
	s.devices = len(free)
	s.readAt = now
	s.commitAndUnlock()
	return nil
}

// Run calls Refresh at once and then every interval until ctx is done,
// and returns nil then. It logs when readings start failing and when they
// recover, not on every failed reading. Without a memory source it returns
// nil at once.
func (s *Sizer) Run(ctx context.Context, interval time.Duration) error {
	if interval <= 0 {
		return fmt.Errorf("sizing: refresh interval is %v, want more than 0", interval)
	}
	if s.src == nil {
		return nil
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	failing := ""
	for {
		err := s.Refresh(ctx)
		switch {
		case err != nil && ctx.Err() != nil:
			return nil
		case err != nil && err.Error() != failing:
			failing = err.Error()
			s.cfg.Logger.Warn("gpu memory reading failed; keeping the last reading", "err", err)
		case err == nil && failing != "":
			failing = ""
			s.cfg.Logger.Info("gpu memory reading recovered")
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Overloaded reports that the engine rejected a batch of n items for lack
// of room (out of memory, HTTP 429). The ceiling becomes half of n, never
// below Min; n <= 0 means the size is unknown and the current size is
// used. Halving the rejected batch's size rather than the ceiling itself
// makes the cut bite when memory, not the ceiling, set the size, and makes
// several rejections of batches sent together count once.
func (s *Sizer) Overloaded(n int) {
	s.mu.Lock()
	if n <= 0 {
		n = s.decision.Load().Size
	}
	if c := max(s.cfg.Min, n/2); c < s.ceiling {
		s.ceiling = c
	}
	s.commitAndUnlock()
}

// SetEngineParallel sets the engine's parallel slots, as the engine said
// them after start (0: no cap). A value below Min is raised to Min.
func (s *Sizer) SetEngineParallel(n int) {
	s.mu.Lock()
	if n > 0 {
		n = max(n, s.cfg.Min)
	}
	s.cfg.EngineParallel = max(0, n)
	s.commitAndUnlock()
}

// Succeeded reports that the engine ran a batch of n items. When n reached
// the ceiling the ceiling grows by GrowthStep, up to Max; a smaller batch
// says nothing about whether a larger one fits, so it leaves the ceiling
// alone.
func (s *Sizer) Succeeded(n int) {
	s.mu.Lock()
	if n >= s.ceiling && s.ceiling < s.cfg.Max {
		s.ceiling = min(s.cfg.Max, s.ceiling+s.cfg.GrowthStep)
	}
	s.commitAndUnlock()
}

// decideLocked computes the decision from the current state.
func (s *Sizer) decideLocked() Decision {
	d := Decision{Size: s.cfg.Max, Reason: ReasonConfig}
	if s.hasRead && s.perItem > 0 {
		var room uint64
		if reserve := uint64(s.cfg.ReserveBytes); s.free > reserve {
			room = s.free - reserve
		}
		switch items := room / uint64(s.perItem); {
		case items >= uint64(s.cfg.Max):
			d = Decision{Size: s.cfg.Max, Reason: ReasonMax}
		case items < uint64(s.cfg.Min):
			d = Decision{Size: s.cfg.Min, Reason: ReasonMin}
		default:
			d = Decision{Size: int(items), Reason: ReasonMemory}
		}
	}
	if s.ceiling < d.Size {
		d = Decision{Size: s.ceiling, Reason: ReasonCeiling}
	}
	if p := s.cfg.EngineParallel; p > 0 && p < d.Size {
		d = Decision{Size: p, Reason: ReasonEngine}
	}
	return d
}

// commitAndUnlock publishes the decision for the state changed under s.mu,
// releases s.mu and, if the decision changed, logs and notifies.
func (s *Sizer) commitAndUnlock() {
	d := s.decideLocked()
	if d == *s.decision.Load() {
		s.mu.Unlock()
		return
	}
	s.decision.Store(&d)
	s.changedAt = s.cfg.Now()
	snap := s.snapshotLocked()
	s.notifyMu.Lock()
	s.mu.Unlock()
	defer s.notifyMu.Unlock()
	s.cfg.Logger.Info("in-flight limit changed",
		"in_flight_limit", snap.Size,
		"reason", snap.Reason,
		"free_bytes", snap.FreeBytes,
		"ceiling", snap.Ceiling)
	if s.cfg.OnChange != nil {
		s.cfg.OnChange(snap)
	}
}
