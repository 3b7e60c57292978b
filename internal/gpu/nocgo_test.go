//go:build !cgo

package gpu_test

import (
	"errors"
	"testing"

	"github.com/sous-run/sous/internal/gpu"
)

// Without cgo there is no NVML: Open says so and nothing else breaks.
func TestNoCgo(t *testing.T) {
	t.Parallel()
	r := gpu.New(gpu.Options{})
	if err := r.Open(t.Context()); !errors.Is(err, gpu.ErrNoNVML) {
		t.Errorf("Open: %v, want ErrNoNVML", err)
	}
	if _, err := r.Read(t.Context()); !errors.Is(err, gpu.ErrNotOpen) {
		t.Errorf("Read: %v, want ErrNotOpen", err)
	}
	if _, err := r.FreeBytes(t.Context()); !errors.Is(err, gpu.ErrNotOpen) {
		t.Errorf("FreeBytes: %v, want ErrNotOpen", err)
	}
	for range 2 {
		if err := r.Shutdown(); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	}
	if err := r.Open(t.Context()); !errors.Is(err, gpu.ErrClosed) {
		t.Errorf("Open after Shutdown: %v, want ErrClosed", err)
	}
}
