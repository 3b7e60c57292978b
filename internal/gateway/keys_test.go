package gateway

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseKeys(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in string
		n        int
		err      string
	}{
		{"comments and blanks", "# c\n\n  \n" + keyLine("a", "k1", "") + keyLine("b", "k2", "models=x,y rate=2.5"), 2, ""},
		{"a key instead of a hash", "a sk-live-secret-value\n", 0, "64 hex digits"},
		{"no hash", "lonely\n", 0, "want"},
		{"unknown field", keyLine("a", "k", "color=red"), 0, "field 3 is not"},
		{"bad rate", keyLine("a", "k", "rate=-1"), 0, "rate="},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			keys, err := ParseKeys([]byte(tc.in), 0)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				if strings.Contains(err.Error(), "sk-live-secret-value") {
					t.Fatal("the error echoes what may be a key")
				}
				return
			}
			if err != nil || len(keys) != tc.n {
				t.Fatalf("%d keys, %v", len(keys), err)
			}
		})
	}
	keys, _ := ParseKeys([]byte(keyLine("b", "k2", "models=x,y rate=2.5")), 0)
	if k := keys[0]; !k.Allows("y") || k.Allows("z") || k.Rate != 2.5 || k.bucket == nil {
		t.Fatalf("%+v", k)
	}
}

func TestKeysReloadOnChange(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "keys")
	write := func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(keyLine("a", "k1", ""))
	k, err := LoadKeys(path, 0, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { k.Watch(ctx, 5*time.Millisecond); close(done) }()
	defer func() { cancel(); <-done }()
	if k.Lookup("k1") == nil || k.Lookup("k2") != nil {
		t.Fatal("initial keys")
	}
	write(keyLine("b", "k2", "") + "# k1 revoked\n")
	waitFor(t, func() bool { return k.Lookup("k2") != nil && k.Lookup("k1") == nil })
	for _, broken := range []string{"garbage line\n", "# all commented out\n"} {
		write(broken)
		time.Sleep(30 * time.Millisecond) // several reload ticks: nothing may change
		if k.Lookup("k2") == nil {
			t.Fatalf("%q replaced the keys in force", broken)
		}
	}
	if _, err := LoadKeys(path, 0, nil, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "no keys") {
		t.Fatalf("a keys file without keys at start: %v", err)
	}
}

func TestBucket(t *testing.T) {
	t.Parallel()
	b := newBucket(2)
	now := time.Unix(0, 0)
	for i := range 2 {
		if ok, _ := b.take(now); !ok {
			t.Fatalf("burst request %d refused", i)
		}
	}
	ok, wait := b.take(now)
	if ok || wait != 500*time.Millisecond {
		t.Fatalf("third: %v wait %s", ok, wait)
	}
	if ok, _ := b.take(now.Add(500 * time.Millisecond)); !ok {
		t.Fatal("a token did not come back after 1/rate")
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Item 10 of the hardening issue: a line with an extra field (a key
// pasted by mistake) is refused without echoing any of it: the error is
// logged at every reload.
func TestParseKeysNeverEchoesAField(t *testing.T) {
	t.Parallel()
	const pasted = "sk-live-abcdefghijklmnopqrstuvwxyz0123456789"
	sum := sha256.Sum256([]byte("k"))
	for _, extra := range []string{pasted, "models=a " + pasted, pasted + "=1"} {
		_, err := ParseKeys([]byte("alice "+hex.EncodeToString(sum[:])+" "+extra+"\n"), 0)
		if err == nil {
			t.Fatalf("%q: accepted", extra)
		}
		for i := 0; i+8 <= len(pasted); i++ {
			if strings.Contains(err.Error(), pasted[i:i+8]) {
				t.Fatalf("the error echoes the field: %v", err)
			}
		}
	}
}
