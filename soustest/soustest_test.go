package soustest

import (
	"go/ast"
	"go/parser"
	"go/token"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/docker/go-connections/nat"
)

// TestKnownSettingsMatchTheWorker: WithSetting accepts exactly the
// variables cmd/worker's Config reads.
func TestKnownSettingsMatchTheWorker(t *testing.T) {
	t.Parallel()
	f, err := parser.ParseFile(token.NewFileSet(), "../cmd/worker/config.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	ast.Inspect(f, func(n ast.Node) bool {
		ts, ok := n.(*ast.TypeSpec)
		if !ok || ts.Name.Name != "Config" {
			return true
		}
		for _, fld := range ts.Type.(*ast.StructType).Fields.List {
			if fld.Tag == nil {
				continue
			}
			tag, _ := strconv.Unquote(fld.Tag.Value)
			if name := reflect.StructTag(tag).Get("env"); name != "" {
				want = append(want, strings.Split(name, ",")[0])
			}
		}
		return false
	})
	if len(want) == 0 {
		t.Fatal("found no env tags in cmd/worker's Config")
	}
	got := strings.Fields(knownSettings)
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("knownSettings drifted from cmd/worker's Config:\n got %v\nwant %v", got, want)
	}
}

func TestOptions(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		opts    []Option
		wantEnv map[string]string
		wantErr string
	}{
		{"typed", []Option{WithQueue("q"), WithBatchMax(8), WithModel("m")}, map[string]string{"SOUS_QUEUE": "q", "SOUS_BATCH_MAX": "8", "SOUS_MODEL": "m"}, ""},
		{"by name", []Option{WithSetting("SOUS_MAX_ATTEMPTS", "3")}, map[string]string{"SOUS_MAX_ATTEMPTS": "3"}, ""},
		{"unknown name", []Option{WithSetting("SOUS_BATCH_MAXX", "3")}, nil, `WithSetting("SOUS_BATCH_MAXX"): the worker reads no such variable`},
		{"bad startup timeout", []Option{WithStartupTimeout(0)}, nil, "want a positive duration"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := settings{env: map[string]string{}}
			var err error
			for _, o := range tt.opts {
				if err = o(&s); err != nil {
					break
				}
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range tt.wantEnv {
				if s.env[k] != v {
					t.Errorf("%s = %q, want %q", k, s.env[k], v)
				}
			}
		})
	}
}

// TestHostPorts: on the host's network the worker's HTTP port and the
// engine's are picked free, unless given.
func TestHostPorts(t *testing.T) {
	t.Parallel()
	s := settings{env: map[string]string{}}
	port := nat.Port(httpPort)
	if err := s.hostPorts(&port); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(s.env["SOUS_HTTP_ADDR"], "127.0.0.1:") || !strings.HasSuffix(string(port), "/tcp") || port == httpPort {
		t.Fatalf("SOUS_HTTP_ADDR %q, port %s", s.env["SOUS_HTTP_ADDR"], port)
	}
	if s.env["SOUS_ENGINE_URL"] != "http://"+s.env["OLLAMA_HOST"] {
		t.Fatalf("SOUS_ENGINE_URL %q, OLLAMA_HOST %q", s.env["SOUS_ENGINE_URL"], s.env["OLLAMA_HOST"])
	}
	given := settings{env: map[string]string{"SOUS_HTTP_ADDR": "127.0.0.1:9999", "SOUS_ENGINE_URL": "http://127.0.0.1:11434"}}
	port = nat.Port(httpPort)
	if err := given.hostPorts(&port); err != nil {
		t.Fatal(err)
	}
	if port != "9999/tcp" || given.env["OLLAMA_HOST"] != "" {
		t.Fatalf("port %s, OLLAMA_HOST %q: given values must win", port, given.env["OLLAMA_HOST"])
	}
}
