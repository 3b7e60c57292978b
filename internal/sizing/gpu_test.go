//go:build cgo

package sizing_test

import (
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"

	"github.com/sous-run/sous/internal/gpu"
	"github.com/sous-run/sous/internal/sizing"
)

var _ sizing.MemorySource = (*gpu.Reader)(nil)

// TestSizesFollowNVML feeds a Sizer from a gpu.Reader on a simulated
// DGX H100 and checks that batch sizes follow the devices' free memory.
func TestSizesFollowNVML(t *testing.T) {
	t.Parallel()
	srv := dgxh100.New()
	lost := make([]bool, len(srv.Devices))
	for i := range srv.Devices {
		d := srv.Devices[i].(*server.Device)
		d.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) {
			if lost[i] {
				return nvml.Memory{}, nvml.ERROR_GPU_IS_LOST
			}
			return d.MemoryInfo, nvml.SUCCESS
		}
	}
	setFree := func(i int, free int64) {
		d := srv.Devices[i].(*server.Device)
		d.MemoryInfo.Free = uint64(free)
		d.MemoryInfo.Used = d.MemoryInfo.Total - uint64(free)
	}

	sel, err := gpu.ParseDevices("0,1", "")
	if err != nil {
		t.Fatal(err)
	}
	r := gpu.New(gpu.Options{Library: srv, Devices: sel})
	if err := r.Open(t.Context()); err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })

	s, err := sizing.New(r, sizing.Config{
		ReserveBytes:    8 * gib,
		ContextLength:   8192,
		KVBytesPerToken: 128 << 10, // 1 GiB per item
	})
	if err != nil {
		t.Fatal(err)
	}

	steps := []struct {
		name        string
		change      func()
		wantErr     bool
		want        sizing.Decision
		wantFreeGiB int64
	}{
		{name: "idle node", change: func() { setFree(0, 70*gib); setFree(1, 70*gib) },
			want: sizing.Decision{Size: 32, Reason: sizing.ReasonMax}, wantFreeGiB: 70},
		{name: "device 1 fills", change: func() { setFree(1, 24*gib) },
			want: sizing.Decision{Size: 16, Reason: sizing.ReasonMemory}, wantFreeGiB: 24},
		{name: "unselected device full", change: func() { setFree(2, 0) },
			want: sizing.Decision{Size: 16, Reason: sizing.ReasonMemory}, wantFreeGiB: 24},
		{name: "device 1 lost", change: func() { lost[1] = true }, wantErr: true,
			want: sizing.Decision{Size: 16, Reason: sizing.ReasonMemory}, wantFreeGiB: 24},
		{name: "device 1 back, nearly full", change: func() { lost[1] = false; setFree(1, 5*gib) },
			want: sizing.Decision{Size: 1, Reason: sizing.ReasonMin}, wantFreeGiB: 5},
		{name: "device 0 fuller", change: func() { setFree(0, 12*gib); setFree(1, 60*gib) },
			want: sizing.Decision{Size: 4, Reason: sizing.ReasonMemory}, wantFreeGiB: 12},
	}
	for _, st := range steps {
		st.change()
		err := s.Refresh(t.Context())
		if (err != nil) != st.wantErr {
			t.Errorf("%s: Refresh error %v, want error %v", st.name, err, st.wantErr)
		}
		snap := s.Snapshot()
		if snap.Decision != st.want || snap.FreeBytes != uint64(st.wantFreeGiB*gib) {
			t.Errorf("%s: %+v with %d GiB free, want %+v with %d GiB", st.name, snap.Decision, snap.FreeBytes/uint64(gib), st.want, st.wantFreeGiB)
		}
	}
}
