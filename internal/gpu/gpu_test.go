package gpu_test

import (
	"fmt"
	"testing"

	"github.com/sous-run/sous/internal/gpu"
)

func TestParseDevices(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		devices  string
		visible  string
		want     string // Selection.String
		wantErr  bool
		wantAll  bool
		wantNone bool
	}{
		{name: "unset and unset", want: "all", wantAll: true},
		{name: "all", devices: "all", want: "all", wantAll: true},
		{name: "all upper", devices: " ALL ", want: "all", wantAll: true},
		{name: "none", devices: "none", want: "none", wantNone: true},
		{name: "none wins over visible", devices: "none", visible: "all", want: "none", wantNone: true},
		{name: "indices", devices: "0,1", want: "0,1"},
		{name: "indices spaced", devices: " 3 , 1 ", want: "3,1"},
		{name: "duplicates", devices: "1,1,01", want: "1"},
		{name: "uuids", devices: "GPU-8c5d0a1e-aaaa,MIG-1f0a", want: "GPU-8c5d0a1e-aaaa,MIG-1f0a"},
		{name: "mixed", devices: "0,GPU-abc", want: "0,GPU-abc"},
		{name: "devices beat visible", devices: "1", visible: "GPU-abc", want: "1"},
		{name: "negative", devices: "-1", wantErr: true},
		{name: "plus", devices: "+1", wantErr: true},
		{name: "word", devices: "first", wantErr: true},
		{name: "empty entry", devices: "0,,1", wantErr: true},
		{name: "trailing comma", devices: "0,", wantErr: true},
		{name: "bare prefix", devices: "GPU-", wantErr: true},
		{name: "huge index", devices: "99999999999999999999", wantErr: true},
		{name: "visible all", visible: "all", want: "all", wantAll: true},
		{name: "visible none", visible: "none", want: "none", wantNone: true},
		{name: "visible void", visible: "void", want: "none", wantNone: true},
		{name: "visible uuids", visible: "GPU-abc,GPU-def", want: "GPU-abc,GPU-def"},
		// Inside a container the runtime renumbers the exposed devices
		// from 0, so host indices select every device NVML sees.
		{name: "visible indices", visible: "2,3", want: "all", wantAll: true},
		{name: "visible mig notation", visible: "0:1", want: "all", wantAll: true},
		{name: "visible mixed", visible: "GPU-abc,1", want: "all", wantAll: true},
		{name: "visible garbage", visible: "???", want: "all", wantAll: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			sel, err := gpu.ParseDevices(tt.devices, tt.visible)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("ParseDevices(%q, %q) = %v, want error", tt.devices, tt.visible, sel)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseDevices(%q, %q): %v", tt.devices, tt.visible, err)
			}
			if got := sel.String(); got != tt.want {
				t.Errorf("String() = %q, want %q", got, tt.want)
			}
			if sel.All() != tt.wantAll || sel.None() != tt.wantNone {
				t.Errorf("All, None = %v, %v; want %v, %v", sel.All(), sel.None(), tt.wantAll, tt.wantNone)
			}
		})
	}
}

func TestSelectionZeroValueIsAll(t *testing.T) {
	t.Parallel()
	var sel gpu.Selection
	if !sel.All() || sel.None() || sel.String() != "all" {
		t.Errorf("zero Selection: All=%v None=%v String=%q", sel.All(), sel.None(), sel.String())
	}
}

// FuzzParseDevices checks that ParseDevices never panics on outside input
// and that a parsed selection survives a round trip through String.
func FuzzParseDevices(f *testing.F) {
	for _, s := range []string{"", "all", "none", "0,1", "GPU-abc,MIG-def", " 1 , 0 ", "0,,", "-1", "void", "0:1"} {
		f.Add(s, s)
	}
	f.Fuzz(func(t *testing.T, devices, visible string) {
		sel, err := gpu.ParseDevices(devices, visible)
		if err != nil {
			return
		}
		again, err := gpu.ParseDevices(sel.String(), "")
		if err != nil {
			t.Fatalf("ParseDevices(%q) of String() of ParseDevices(%q, %q): %v", sel.String(), devices, visible, err)
		}
		if again.String() != sel.String() {
			t.Fatalf("round trip: %q became %q", sel.String(), again.String())
		}
	})
}

func ExampleParseDevices() {
	// cmd/worker passes os.Getenv("SOUS_GPU_DEVICES") and
	// os.Getenv("NVIDIA_VISIBLE_DEVICES").
	for _, env := range [][2]string{
		{"", ""},
		{"0,1", "all"},
		{"", "GPU-8c5d0a1e,GPU-77f3b2c4"},
		{"", "2,3"},
		{"none", ""},
	} {
		sel, err := gpu.ParseDevices(env[0], env[1])
		if err != nil {
			fmt.Println(err)
			continue
		}
		fmt.Printf("%q %q -> %s\n", env[0], env[1], sel)
	}
	// Output:
	// "" "" -> all
	// "0,1" "all" -> 0,1
	// "" "GPU-8c5d0a1e,GPU-77f3b2c4" -> GPU-8c5d0a1e,GPU-77f3b2c4
	// "" "2,3" -> all
	// "none" "" -> none
}
