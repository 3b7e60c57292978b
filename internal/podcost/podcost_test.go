package podcost

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// fakePods records patches and fails while err is set.
type fakePods struct {
	bodies []string
	err    error
}

func (f *fakePods) patch(_ context.Context, ns, name string, body []byte) error {
	if ns != "ns" || name != "pod-1" {
		return errors.New("wrong pod")
	}
	if f.err != nil {
		return f.err
	}
	f.bodies = append(f.bodies, string(body))
	return nil
}

func (f *fakePods) costs() []string {
	var out []string
	for _, b := range f.bodies {
		var m struct {
			Metadata struct {
				Annotations map[string]string `json:"annotations"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal([]byte(b), &m); err != nil {
			panic(err)
		}
		out = append(out, m.Metadata.Annotations[Annotation])
	}
	return out
}

type step struct {
	after    time.Duration // clock advance before the sync
	inFlight int
	fail     bool
}

func TestSync(t *testing.T) {
	t.Parallel()
	notAllowed := apierrors.NewForbidden(schema.GroupResource{Resource: "pods"}, "pod-1", errors.New("no"))
	for _, tc := range []struct {
		name    string
		steps   []step
		want    []string // costs patched, in order
		wantLog string
	}{
		{"starts idle, patches once", []step{{0, 0, false}, {time.Second, 0, false}, {time.Minute, 0, false}}, []string{"0"}, ""},
		{"idle to busy at once", []step{{0, 0, false}, {100 * time.Millisecond, 7, false}}, []string{"0", "7"}, ""},
		{"busy changes are rate limited", []step{{0, 0, false}, {0, 7, false}, {time.Second, 9, false}, {time.Second, 12, false}, {5 * time.Second, 12, false}}, []string{"0", "7", "12"}, ""},
		{"busy to idle waits for the interval", []step{{0, 3, false}, {time.Second, 0, false}, {5 * time.Second, 0, false}}, []string{"3", "0"}, ""},
		{"a refused patch is logged with a hint and retried later", []step{{0, 0, true}, {time.Second, 5, true}, {time.Second, 5, false}, {5 * time.Second, 5, false}}, []string{"5"}, "Role allowing patch on pods"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fake := &fakePods{}
			var inFlight atomic.Int64
			var logs bytes.Buffer
			k, err := newKeeper(Config{Namespace: "ns", Name: "pod-1", InFlight: func() int { return int(inFlight.Load()) }}, fake, slog.New(slog.NewTextHandler(&logs, nil)))
			if err != nil {
				t.Fatal(err)
			}
			now := time.Unix(1000, 0)
			k.clock = func() time.Time { return now }
			for _, s := range tc.steps {
				now = now.Add(s.after)
				inFlight.Store(int64(s.inFlight))
				fake.err = nil
				if s.fail {
					fake.err = notAllowed
				}
				k.Sync(context.Background())
			}
			if got := strings.Join(fake.costs(), ","); got != strings.Join(tc.want, ",") {
				t.Fatalf("patched costs %q, want %q", got, strings.Join(tc.want, ","))
			}
			if tc.wantLog != "" && !strings.Contains(logs.String(), tc.wantLog) {
				t.Fatalf("log %q lacks %q", logs.String(), tc.wantLog)
			}
			if n := strings.Count(logs.String(), "level=WARN"); tc.wantLog != "" && n != 1 {
				t.Fatalf("%d warnings for one failure streak, want 1:\n%s", n, logs.String())
			}
		})
	}
}

func TestCost(t *testing.T) {
	t.Parallel()
	for in, want := range map[int]int{-1: 0, 0: 0, 1: 1, 128: 128, 1 << 40: 1<<31 - 1} {
		if got := Cost(in); got != want {
			t.Errorf("Cost(%d) = %d, want %d", in, got, want)
		}
	}
}

func TestNewRefusesAMissingPod(t *testing.T) {
	t.Parallel()
	if _, err := newKeeper(Config{Namespace: "ns", InFlight: func() int { return 0 }}, &fakePods{}, nil); err == nil || !strings.Contains(err.Error(), "metadata.name") {
		t.Fatalf("err %v", err)
	}
	if _, err := newKeeper(Config{Namespace: "ns", Name: "p"}, &fakePods{}, nil); err == nil {
		t.Fatal("no InFlight accepted")
	}
}
