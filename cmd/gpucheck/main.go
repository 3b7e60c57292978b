// Command gpucheck reads the GPUs through NVML (the real go-nvml path the
// worker uses, not a mock) and prints each device and the in-flight limit
// the sizer would choose for a per-request memory estimate. `make
// gpu-check` runs it on a machine with an NVIDIA driver; without one it
// says NVML is missing and exits 1.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/sous-run/sous/internal/gpu"
	"github.com/sous-run/sous/internal/sizing"
)

func main() {
	itemBytes := flag.Int64("item-bytes", 1<<30, "GPU memory one request in flight needs (SOUS_BATCH_ITEM_BYTES)")
	reserve := flag.Int64("reserve", 0, "GPU memory never counted as room (SOUS_GPU_RESERVE_BYTES)")
	maxLimit := flag.Int("max", 32, "largest in-flight limit (SOUS_BATCH_MAX)")
	slots := flag.Int("slots", 0, "the engine's slots (SOUS_ENGINE_PARALLEL); 0: no cap")
	devices := flag.String("devices", "all", "SOUS_GPU_DEVICES")
	flag.Parse()
	if err := run(*itemBytes, *reserve, *maxLimit, *slots, *devices); err != nil {
		fmt.Fprintln(os.Stderr, "gpucheck:", err)
		os.Exit(1)
	}
}

func run(itemBytes, reserve int64, maxLimit, slots int, devices string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sel, err := gpu.ParseDevices(devices, os.Getenv("NVIDIA_VISIBLE_DEVICES"))
	if err != nil {
		return err
	}
	r := gpu.New(gpu.Options{Devices: sel})
	start := time.Now()
	if err := r.Open(ctx); err != nil {
		return fmt.Errorf("open NVML: %w", err)
	}
	defer func() { _ = r.Shutdown() }()
	fmt.Printf("nvml: opened in %s\n", time.Since(start).Round(time.Microsecond))
	devs, err := r.Read(ctx)
	if err != nil {
		return fmt.Errorf("read devices: %w", err)
	}
	for _, d := range devs {
		fmt.Printf("device %d: %s uuid=%s total=%d free=%d used=%d util_gpu=%d%% util_mem=%d%%\n",
			d.Index, d.Name, d.UUID, d.Memory.TotalBytes, d.Memory.FreeBytes, d.Memory.UsedBytes, d.Utilization.GPUPercent, d.Utilization.MemoryPercent)
	}
	t0 := time.Now()
	free, err := r.FreeBytes(ctx)
	if err != nil {
		return fmt.Errorf("free bytes: %w", err)
	}
	fmt.Printf("free bytes per device: %v (read in %s)\n", free, time.Since(t0).Round(time.Microsecond))
	s, err := sizing.New(r, sizing.Config{Max: maxLimit, BytesPerItem: itemBytes, ReserveBytes: reserve, EngineParallel: slots})
	if err != nil {
		return err
	}
	if err := s.Refresh(ctx); err != nil {
		return fmt.Errorf("sizer refresh: %w", err)
	}
	snap := s.Snapshot()
	fmt.Printf("decision: in_flight_limit=%d reason=%s (item_bytes=%d reserve=%d max=%d slots=%d) prefetch=%d\n",
		snap.Size, snap.Reason, itemBytes, reserve, maxLimit, slots, 3*snap.Size)
	return nil
}
