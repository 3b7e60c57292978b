//go:build cgo

package gpu_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/gpus"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"

	"github.com/sous-run/sous/internal/gpu"
)

// go-nvml's simulated servers satisfy the Library the Reader needs.
var _ gpu.Library = (*server.Server)(nil)

const gib = uint64(1) << 30

// mockDevice returns the simulated device i of srv, to set its readings.
func mockDevice(t *testing.T, srv *server.Server, i int) *server.Device {
	t.Helper()
	d, ok := srv.Devices[i].(*server.Device)
	if !ok {
		t.Fatalf("device %d is %T, want *server.Device", i, srv.Devices[i])
	}
	return d
}

// setReading sets what the simulated device i reports. The simulated
// servers report Free and Used as 0 and have no utilisation until told.
func setReading(t *testing.T, srv *server.Server, i int, free uint64, util nvml.Utilization) {
	t.Helper()
	d := mockDevice(t, srv, i)
	d.MemoryInfo = nvml.Memory{Total: d.MemoryInfo.Total, Free: free, Used: d.MemoryInfo.Total - free}
	d.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) { return util, nvml.SUCCESS }
}

// setup opens a Reader on lib for the selection devices (ParseDevices
// syntax) and shuts it down when the test ends.
func setup(t *testing.T, lib gpu.Library, devices string) *gpu.Reader {
	t.Helper()
	sel, err := gpu.ParseDevices(devices, "")
	if err != nil {
		t.Fatalf("ParseDevices(%q): %v", devices, err)
	}
	r := gpu.New(gpu.Options{Library: lib, Devices: sel})
	if err := r.Open(t.Context()); err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Shutdown(); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	return r
}

func read(t *testing.T, r *gpu.Reader) []gpu.Device {
	t.Helper()
	devs, err := r.Read(t.Context())
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	return devs
}

func TestReadFollowsMock(t *testing.T) {
	t.Parallel()
	srv := dgxh100.NewWithGPUs(gpus.Multiple(2, gpus.H100_SXM5_80GB)...)
	setReading(t, srv, 0, 60*gib, nvml.Utilization{Gpu: 35, Memory: 20})
	setReading(t, srv, 1, 10*gib, nvml.Utilization{Gpu: 99, Memory: 80})
	r := setup(t, srv, "")

	devs := read(t, r)
	if len(devs) != 2 {
		t.Fatalf("read %d devices, want 2", len(devs))
	}
	total := uint64(gpus.H100_SXM5_80GB.MemoryMB) << 20
	want := []gpu.Device{
		{Index: 0, UUID: mockDevice(t, srv, 0).UUID, Name: gpus.H100_SXM5_80GB.Name,
			Memory:      gpu.Memory{TotalBytes: total, FreeBytes: 60 * gib, UsedBytes: total - 60*gib},
			Utilization: gpu.Utilization{GPUPercent: 35, MemoryPercent: 20}, UtilizationOK: true},
		{Index: 1, UUID: mockDevice(t, srv, 1).UUID, Name: gpus.H100_SXM5_80GB.Name,
			Memory:      gpu.Memory{TotalBytes: total, FreeBytes: 10 * gib, UsedBytes: total - 10*gib},
			Utilization: gpu.Utilization{GPUPercent: 99, MemoryPercent: 80}, UtilizationOK: true},
	}
	for i := range want {
		if devs[i] != want[i] {
			t.Errorf("device %d:\n got %+v\nwant %+v", i, devs[i], want[i])
		}
	}

	// Each Read queries NVML again: nothing is cached.
	setReading(t, srv, 1, 70*gib, nvml.Utilization{Gpu: 1})
	devs = read(t, r)
	if got := devs[1].Memory.FreeBytes; got != 70*gib {
		t.Errorf("after the device freed memory, FreeBytes = %d, want %d", got, 70*gib)
	}
	if got := devs[1].Utilization.GPUPercent; got != 1 {
		t.Errorf("after the device idled, GPUPercent = %d, want 1", got)
	}
}

func TestReadSeveralDevices(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		srv  *server.Server
		want []string // product names in index order
	}{
		{name: "dgxa100", srv: dgxa100.New(), want: []string{
			gpus.A100_SXM4_40GB.Name, gpus.A100_SXM4_40GB.Name, gpus.A100_SXM4_40GB.Name, gpus.A100_SXM4_40GB.Name,
			gpus.A100_SXM4_40GB.Name, gpus.A100_SXM4_40GB.Name, gpus.A100_SXM4_40GB.Name, gpus.A100_SXM4_40GB.Name,
		}},
		{name: "dgxh100", srv: dgxh100.New(), want: []string{
			gpus.H100_SXM5_80GB.Name, gpus.H100_SXM5_80GB.Name, gpus.H100_SXM5_80GB.Name, gpus.H100_SXM5_80GB.Name,
			gpus.H100_SXM5_80GB.Name, gpus.H100_SXM5_80GB.Name, gpus.H100_SXM5_80GB.Name, gpus.H100_SXM5_80GB.Name,
		}},
		{name: "mixed", srv: dgxh100.NewWithGPUs(gpus.H100_SXM5_80GB, gpus.A100_SXM4_40GB, gpus.A30_PCIE_24GB), want: []string{
			gpus.H100_SXM5_80GB.Name, gpus.A100_SXM4_40GB.Name, gpus.A30_PCIE_24GB.Name,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			for i := range tt.srv.Devices {
				setReading(t, tt.srv, i, uint64(i+1)*gib, nvml.Utilization{Gpu: uint32(10 * i)})
			}
			devs := read(t, setup(t, tt.srv, "all"))
			if len(devs) != len(tt.want) {
				t.Fatalf("read %d devices, want %d", len(devs), len(tt.want))
			}
			for i, d := range devs {
				cfg := mockDevice(t, tt.srv, i).Config
				switch {
				case d.Err != nil:
					t.Errorf("device %d: %v", i, d.Err)
				case d.Index != i || d.Name != tt.want[i]:
					t.Errorf("device %d is %d %q, want %d %q", i, d.Index, d.Name, i, tt.want[i])
				case d.Memory.TotalBytes != cfg.MemoryMB<<20:
					t.Errorf("device %d total %d, want %d", i, d.Memory.TotalBytes, cfg.MemoryMB<<20)
				case d.Memory.FreeBytes != uint64(i+1)*gib:
					t.Errorf("device %d free %d, want %d", i, d.Memory.FreeBytes, uint64(i+1)*gib)
				case d.Utilization.GPUPercent != uint32(10*i):
					t.Errorf("device %d utilisation %d, want %d", i, d.Utilization.GPUPercent, 10*i)
				}
			}
		})
	}
}

func TestReadDeviceError(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		breakIt func(d *server.Device)
		wantIs  error
	}{
		{name: "gpu lost", breakIt: func(d *server.Device) {
			d.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) { return nvml.Memory{}, nvml.ERROR_GPU_IS_LOST }
		}, wantIs: nvml.ERROR_GPU_IS_LOST},
		{name: "binding panics", breakIt: func(d *server.Device) {
			d.GetMemoryInfoFunc = nil // the simulated device panics
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := dgxh100.NewWithGPUs(gpus.Multiple(3, gpus.H100_SXM5_80GB)...)
			for i := range 3 {
				setReading(t, srv, i, uint64(10*(i+1))*gib, nvml.Utilization{})
			}
			tt.breakIt(mockDevice(t, srv, 1))
			r := setup(t, srv, "")

			devs := read(t, r)
			if len(devs) != 3 {
				t.Fatalf("read %d devices, want 3: a failing device is still reported", len(devs))
			}
			if devs[1].Err == nil {
				t.Fatalf("device 1: no error, want one")
			}
			if tt.wantIs != nil && !errors.Is(devs[1].Err, tt.wantIs) {
				t.Errorf("device 1: error %v, want %v", devs[1].Err, tt.wantIs)
			}
			if devs[1].Memory != (gpu.Memory{}) || devs[1].UUID == "" {
				t.Errorf("device 1: %+v, want zero memory and its identity", devs[1])
			}
			for _, i := range []int{0, 2} {
				if devs[i].Err != nil || devs[i].Memory.FreeBytes != uint64(10*(i+1))*gib {
					t.Errorf("device %d: %+v, want a good reading of %d GiB free", i, devs[i], 10*(i+1))
				}
			}

			free, err := r.FreeBytes(t.Context())
			if err == nil {
				t.Errorf("FreeBytes: no error, want one naming device 1")
			}
			if want := []uint64{10 * gib, 30 * gib}; len(free) != 2 || free[0] != want[0] || free[1] != want[1] {
				t.Errorf("FreeBytes = %v, want %v", free, want)
			}
		})
	}
}

func TestUtilizationOptional(t *testing.T) {
	t.Parallel()
	srv := dgxh100.NewWithGPUs(gpus.Multiple(2, gpus.H100_SXM5_80GB)...)
	setReading(t, srv, 0, 5*gib, nvml.Utilization{})
	setReading(t, srv, 1, 5*gib, nvml.Utilization{})
	mockDevice(t, srv, 0).GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) {
		return nvml.Utilization{}, nvml.ERROR_NOT_SUPPORTED // as on a MIG instance
	}
	mockDevice(t, srv, 1).GetUtilizationRatesFunc = nil // the simulated device panics

	for i, d := range read(t, setup(t, srv, "")) {
		if d.Err != nil || d.UtilizationOK || d.Memory.FreeBytes != 5*gib {
			t.Errorf("device %d: %+v, want memory read and utilisation not OK", i, d)
		}
	}
}

func TestSelection(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		devices func(uuids []string) string
		visible func(uuids []string) string
		want    []int // indices read
	}{
		{name: "default is all", devices: func([]string) string { return "" }, want: []int{0, 1, 2, 3}},
		{name: "all", devices: func([]string) string { return "all" }, want: []int{0, 1, 2, 3}},
		{name: "by index", devices: func([]string) string { return "2,0" }, want: []int{2, 0}},
		{name: "by uuid", devices: func(u []string) string { return u[3] + "," + u[1] }, want: []int{3, 1}},
		{name: "index and uuid of one device", devices: func(u []string) string { return "1," + u[1] }, want: []int{1}},
		{name: "visible uuid", devices: func([]string) string { return "" }, visible: func(u []string) string { return u[2] }, want: []int{2}},
		{name: "visible host indices", devices: func([]string) string { return "" }, visible: func([]string) string { return "5,6" }, want: []int{0, 1, 2, 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := dgxh100.NewWithGPUs(gpus.Multiple(4, gpus.H100_SXM5_80GB)...)
			uuids := make([]string, len(srv.Devices))
			for i := range srv.Devices {
				setReading(t, srv, i, uint64(i)*gib, nvml.Utilization{})
				uuids[i] = mockDevice(t, srv, i).UUID
			}
			visible := ""
			if tt.visible != nil {
				visible = tt.visible(uuids)
			}
			sel, err := gpu.ParseDevices(tt.devices(uuids), visible)
			if err != nil {
				t.Fatalf("ParseDevices: %v", err)
			}
			r := gpu.New(gpu.Options{Library: srv, Devices: sel})
			if err := r.Open(t.Context()); err != nil {
				t.Fatalf("Open: %v", err)
			}
			t.Cleanup(func() { _ = r.Shutdown() })
			devs := read(t, r)
			if len(devs) != len(tt.want) {
				t.Fatalf("read %d devices, want %v", len(devs), tt.want)
			}
			for i, d := range devs {
				if d.Index != tt.want[i] || d.UUID != uuids[tt.want[i]] || d.Memory.FreeBytes != uint64(tt.want[i])*gib {
					t.Errorf("reading %d is device %d %s (%d free), want device %d", i, d.Index, d.UUID, d.Memory.FreeBytes, tt.want[i])
				}
			}
		})
	}
}

func TestOpenFails(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		lib       func() gpu.Library
		devices   string
		wantIs    []error
		wantNotIs error
		// wantShutdown: NVML was initialised, so Open must shut it down.
		wantShutdown bool
	}{
		{
			name:   "library absent (real go-nvml, no such file)",
			lib:    func() gpu.Library { return nvml.New(nvml.WithLibraryPath("/nonexistent/libnvidia-ml.so.1")) },
			wantIs: []error{gpu.ErrNoNVML, nvml.ERROR_LIBRARY_NOT_FOUND},
		},
		{
			name:   "library absent (simulated)",
			lib:    func() gpu.Library { return initReturns(nvml.ERROR_LIBRARY_NOT_FOUND) },
			wantIs: []error{gpu.ErrNoNVML, nvml.ERROR_LIBRARY_NOT_FOUND},
		},
		{
			name:   "driver not loaded",
			lib:    func() gpu.Library { return initReturns(nvml.ERROR_DRIVER_NOT_LOADED) },
			wantIs: []error{gpu.ErrNoNVML, nvml.ERROR_DRIVER_NOT_LOADED},
		},
		{
			name: "init panics",
			lib: func() gpu.Library {
				srv := dgxh100.New()
				srv.InitFunc = func() nvml.Return { panic("dlopen exploded") }
				return srv
			},
			wantIs: []error{gpu.ErrNoNVML},
		},
		{
			name:      "no permission is not a missing library",
			lib:       func() gpu.Library { return initReturns(nvml.ERROR_NO_PERMISSION) },
			wantIs:    []error{nvml.ERROR_NO_PERMISSION},
			wantNotIs: gpu.ErrNoNVML,
		},
		{
			name:    "selection none",
			lib:     func() gpu.Library { return dgxh100.New() },
			devices: "none",
			wantIs:  []error{gpu.ErrNoDevices},
		},
		{
			name:         "node without devices",
			lib:          func() gpu.Library { return dgxh100.NewWithGPUs() },
			wantIs:       []error{gpu.ErrNoDevices},
			wantShutdown: true,
		},
		{
			name:         "index out of range",
			lib:          func() gpu.Library { return dgxh100.New() },
			devices:      "0,8",
			wantIs:       []error{nvml.ERROR_INVALID_ARGUMENT},
			wantNotIs:    gpu.ErrNoNVML,
			wantShutdown: true,
		},
		{
			name:         "unknown uuid",
			lib:          func() gpu.Library { return dgxh100.New() },
			devices:      "GPU-00000000-0000-0000-0000-000000000000",
			wantIs:       []error{nvml.ERROR_INVALID_ARGUMENT},
			wantNotIs:    gpu.ErrNoNVML,
			wantShutdown: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			sel, err := gpu.ParseDevices(tt.devices, "")
			if err != nil {
				t.Fatalf("ParseDevices: %v", err)
			}
			lib := tt.lib()
			r := gpu.New(gpu.Options{Library: lib, Devices: sel})
			err = r.Open(t.Context())
			if err == nil {
				t.Fatal("Open: no error")
			}
			for _, target := range tt.wantIs {
				if !errors.Is(err, target) {
					t.Errorf("Open: %v, want it to wrap %v", err, target)
				}
			}
			if tt.wantNotIs != nil && errors.Is(err, tt.wantNotIs) {
				t.Errorf("Open: %v, want it not to wrap %v", err, tt.wantNotIs)
			}
			if _, err := r.Read(t.Context()); !errors.Is(err, gpu.ErrNotOpen) {
				t.Errorf("Read after failed Open: %v, want ErrNotOpen", err)
			}
			if err := r.Shutdown(); err != nil {
				t.Errorf("Shutdown after failed Open: %v", err)
			}
			if srv, ok := lib.(*server.Server); ok {
				if got := len(srv.ShutdownCalls()); got != boolInt(tt.wantShutdown) {
					t.Errorf("NVML Shutdown called %d times, want %d", got, boolInt(tt.wantShutdown))
				}
				// After a failed Init, real go-nvml ends the process on
				// any other call ("symbol lookup error"): none may be made.
				calls := len(srv.DeviceGetCountCalls()) + len(srv.DeviceGetHandleByIndexCalls()) + len(srv.DeviceGetHandleByUUIDCalls())
				if errors.Is(err, gpu.ErrNoNVML) && calls != 0 {
					t.Errorf("%d NVML calls after a failed Init, want none", calls)
				}
			}
		})
	}
}

func initReturns(ret nvml.Return) *server.Server {
	srv := dgxh100.New()
	srv.InitFunc = func() nvml.Return { return ret }
	return srv
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestOpenRealLibrary opens the library this machine has. On a node
// without libnvidia-ml that must be ErrNoNVML and nothing else.
func TestOpenRealLibrary(t *testing.T) {
	t.Parallel()
	r := gpu.New(gpu.Options{})
	defer func() {
		if err := r.Shutdown(); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	}()
	err := r.Open(t.Context())
	switch {
	case err == nil:
		devs := read(t, r)
		t.Logf("NVML present: read %d devices", len(devs))
		for _, d := range devs {
			t.Logf("%d %s %s: %+v utilisation %+v (ok %v) err %v", d.Index, d.UUID, d.Name, d.Memory, d.Utilization, d.UtilizationOK, d.Err)
		}
	case errors.Is(err, gpu.ErrNoNVML):
		t.Logf("NVML absent: %v", err)
	default:
		t.Logf("NVML present but unusable: %v", err)
	}
}

func TestLifecycle(t *testing.T) {
	t.Parallel()
	srv := dgxh100.New()
	r := gpu.New(gpu.Options{Library: srv})

	if _, err := r.Read(t.Context()); !errors.Is(err, gpu.ErrNotOpen) {
		t.Errorf("Read before Open: %v, want ErrNotOpen", err)
	}
	if _, err := r.FreeBytes(t.Context()); !errors.Is(err, gpu.ErrNotOpen) {
		t.Errorf("FreeBytes before Open: %v, want ErrNotOpen", err)
	}
	for range 2 {
		if err := r.Open(t.Context()); err != nil {
			t.Fatalf("Open: %v", err)
		}
	}
	if got := len(srv.InitCalls()); got != 1 {
		t.Errorf("Init called %d times after two Opens, want 1", got)
	}
	if len(read(t, r)) != 8 {
		t.Errorf("want 8 devices")
	}
	for range 2 {
		if err := r.Shutdown(); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	}
	if got := len(srv.ShutdownCalls()); got != 1 {
		t.Errorf("NVML Shutdown called %d times after two Shutdowns, want 1", got)
	}
	if _, err := r.Read(t.Context()); !errors.Is(err, gpu.ErrNotOpen) {
		t.Errorf("Read after Shutdown: %v, want ErrNotOpen", err)
	}
	if err := r.Open(t.Context()); !errors.Is(err, gpu.ErrClosed) {
		t.Errorf("Open after Shutdown: %v, want ErrClosed", err)
	}

	early := gpu.New(gpu.Options{Library: dgxh100.New()})
	if err := early.Shutdown(); err != nil {
		t.Errorf("Shutdown before Open: %v", err)
	}
}

func TestReadCanceled(t *testing.T) {
	t.Parallel()
	r := setup(t, dgxh100.New(), "")
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := r.Read(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Read with a canceled context: %v, want context.Canceled", err)
	}
	if err := gpu.New(gpu.Options{Library: dgxh100.New()}).Open(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Open with a canceled context: %v, want context.Canceled", err)
	}
}

// TestShutdownDuringReads checks that Shutdown never unloads NVML under a
// read in progress: every Read either completes or reports ErrNotOpen.
func TestShutdownDuringReads(t *testing.T) {
	t.Parallel()
	srv := dgxh100.New()
	var shut atomic.Bool
	srv.ShutdownFunc = func() nvml.Return { shut.Store(true); return nvml.SUCCESS }
	for i := range srv.Devices {
		mockDevice(t, srv, i).GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) {
			if shut.Load() {
				t.Error("memory read after NVML shutdown")
			}
			return nvml.Memory{Total: 1, Free: 1}, nvml.SUCCESS
		}
	}
	r := gpu.New(gpu.Options{Library: srv})
	if err := r.Open(t.Context()); err != nil {
		t.Fatalf("Open: %v", err)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 100 {
				devs, err := r.Read(t.Context())
				if err != nil {
					if !errors.Is(err, gpu.ErrNotOpen) {
						t.Errorf("Read: %v", err)
					}
					return
				}
				if len(devs) != 8 {
					t.Errorf("Read %d devices, want 8", len(devs))
				}
			}
		})
	}
	if err := r.Shutdown(); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	wg.Wait()
}

func ExampleReader() {
	// A simulated DGX H100 stands in for libnvidia-ml; production code
	// leaves Options.Library nil.
	srv := dgxh100.New()
	for i := range srv.Devices {
		d := srv.Devices[i].(*server.Device)
		d.MemoryInfo.Free = uint64(10*(i+1)) << 30
		d.MemoryInfo.Used = d.MemoryInfo.Total - d.MemoryInfo.Free
	}
	sel, err := gpu.ParseDevices("0,1", "")
	if err != nil {
		fmt.Println(err)
		return
	}
	r := gpu.New(gpu.Options{Library: srv, Devices: sel})
	if err := r.Open(context.Background()); err != nil {
		// errors.Is(err, gpu.ErrNoNVML): log once, size from configuration.
		fmt.Println(err)
		return
	}
	defer r.Shutdown()

	devs, err := r.Read(context.Background())
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, d := range devs {
		if d.Err != nil {
			fmt.Println(d.Index, d.Err)
			continue
		}
		fmt.Printf("GPU %d %s: %d of %d GiB free\n", d.Index, d.Name, d.Memory.FreeBytes>>30, d.Memory.TotalBytes>>30)
	}
	// Output:
	// GPU 0 NVIDIA H100 80GB HBM3: 10 of 80 GiB free
	// GPU 1 NVIDIA H100 80GB HBM3: 20 of 80 GiB free
}
