package main

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/sous-run/sous/internal/gpu"
	"github.com/sous-run/sous/internal/sizing"
)

// batchSizer adapts *sizing.Sizer to the worker's Sizer.
type batchSizer struct {
	*sizing.Sizer
	changed *sizeSignal
}

func (s batchSizer) Size() int { return s.Sizer.Size().Size }

// OnChange sets f to be called each time the in-flight limit changes (the
// engine's slots, free GPU memory, the AIMD ceiling): the worker's
// SizeChanged, so that a larger limit reaches the engine at once rather
// than when some call ends. f must return quickly.
func (s batchSizer) OnChange(f func()) { s.changed.f.Store(&f) }

// sizeSignal forwards the sizer's OnChange to a function set once the
// worker exists (the sizer is built first: the worker's prefetch comes from
// it).
type sizeSignal struct{ f atomic.Pointer[func()] }

func (s *sizeSignal) notify(sizing.Snapshot) {
	if f := s.f.Load(); f != nil {
		(*f)()
	}
}

// startSizer opens NVML when it is there and starts the sizer's refresh
// loop. Without NVML (no GPU, CPU-only node) it says so once and sizes from
// configuration alone. stop ends the loop and closes NVML.
func startSizer(ctx context.Context, cfg Config, log *slog.Logger) (s batchSizer, stop func(), err error) {
	sc := cfg.sizingConfig()
	sc.Logger = log
	sig := &sizeSignal{}
	sc.OnChange = sig.notify
	sel, err := gpu.ParseDevices(cfg.GPUDevices, cfg.NvidiaVisible)
	if err != nil {
		return s, nil, bad("SOUS_GPU_DEVICES", "%v", err)
	}
	reader := gpu.New(gpu.Options{Devices: sel})
	var src sizing.MemorySource
	switch err := reader.Open(ctx); {
	case err == nil:
		devs, _ := reader.Read(ctx)
		for _, d := range devs {
			log.Info("gpu", "index", d.Index, "name", d.Name, "uuid", d.UUID, "total_bytes", d.Memory.TotalBytes, "free_bytes", d.Memory.FreeBytes)
		}
		src = reader
	case errors.Is(err, gpu.ErrNoNVML), errors.Is(err, gpu.ErrNoDevices):
		log.Info("no GPU memory readings; batch size comes from configuration alone", "reason", err.Error())
	default:
		return s, nil, bad("SOUS_GPU_DEVICES", "%v", err)
	}
	sz, err := sizing.New(src, sc)
	if err != nil {
		_ = reader.Shutdown()
		return s, nil, err
	}
	runCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	if src != nil {
		_ = sz.Refresh(runCtx)
		wg.Go(func() { _ = sz.Run(runCtx, cfg.GPURefresh) })
	}
	stop = func() {
		cancel()
		wg.Wait()
		_ = reader.Shutdown()
	}
	return batchSizer{sz, sig}, stop, nil
}
