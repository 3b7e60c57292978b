//go:build linux

package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// binGlob is where Debian's postgresql-NN packages put the server binaries.
const binGlob = "/usr/lib/postgresql/*/bin/postgres"

const installHint = "install the PostgreSQL server: apt-get install postgresql"

// Start starts a private PostgreSQL server for t and returns the URL of a
// fresh database "test" on it (user postgres, no password). The server is
// stopped (fast shutdown, then killed if it lingers) and its files removed
// when t ends.
func Start(t testing.TB) string {
	t.Helper()
	bin, err := findBin()
	if err != nil {
		unavailable(t, err.Error())
	}
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		// initdb and postgres refuse to run as root.
		u, err := user.Lookup("postgres")
		if err != nil {
			unavailable(t, fmt.Sprintf("running as root needs the postgres user to run the server as: %v", err))
		}
		uid, _ := strconv.ParseUint(u.Uid, 10, 32)
		gid, _ := strconv.ParseUint(u.Gid, 10, 32)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "sock")
	if err := os.Mkdir(sock, 0o700); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	if cred != nil {
		// The server's user must reach its directory: testing makes
		// TempDir's parent root's alone.
		if err := os.Chmod(filepath.Dir(dir), 0o711); err != nil {
			t.Fatalf("pgtest: %v", err)
		}
		for _, d := range []string{dir, sock} {
			if err := os.Chown(d, int(cred.Uid), int(cred.Gid)); err != nil {
				t.Fatalf("pgtest: %v", err)
			}
		}
	}
	data := filepath.Join(dir, "data")
	initdb := command(cred, filepath.Join(filepath.Dir(bin), "initdb"),
		"-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync")
	if out, err := initdb.CombinedOutput(); err != nil {
		t.Fatalf("pgtest: initdb: %v\n%s", err, out)
	}
	// A free port can be taken by someone else before the server binds it:
	// try a few.
	var lastErr error
	for range 3 {
		port, err := freePort()
		if err != nil {
			t.Fatalf("pgtest: %v", err)
		}
		s, err := start(t, cred, bin, dir, data, sock, port)
		if err != nil {
			lastErr = err
			continue
		}
		t.Cleanup(s.stop)
		url := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
		return createDatabase(t, url, "test")
	}
	t.Fatalf("pgtest: %v", lastErr)
	return ""
}

// Database creates a new, empty database on the server of url (a URL that
// Start returned) and returns its URL, for tests that want one each.
func Database(t testing.TB, url string) string {
	t.Helper()
	return createDatabase(t, url, fmt.Sprintf("db%d", dbSeq.Add(1)))
}

var dbSeq atomic.Int64

func createDatabase(t testing.TB, url, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("pgtest: connect: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("pgtest: create database %s: %v", name, err)
	}
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return fmt.Sprintf("postgres://%s@%s:%d/%s?sslmode=disable", cfg.User, cfg.Host, cfg.Port, name)
}

func unavailable(t testing.TB, why string) {
	t.Helper()
	msg := "pgtest: no PostgreSQL server to test with: " + why + "; " + installHint
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// findBin returns the postgres binary of the newest installed version.
func findBin() (string, error) {
	bins, _ := filepath.Glob(binGlob)
	var best string
	bestVer := -1
	for _, b := range bins {
		v, err := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(b))))
		if err != nil {
			continue
		}
		if _, err := os.Stat(filepath.Join(filepath.Dir(b), "initdb")); err != nil {
			continue
		}
		if v > bestVer {
			best, bestVer = b, v
		}
	}
	if best == "" {
		return "", fmt.Errorf("no %s with initdb beside it", binGlob)
	}
	return best, nil
}

func command(cred *syscall.Credential, name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C"}
	// Pdeathsig: a test binary that dies does not leave a server behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGKILL}
	return cmd
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

type server struct {
	t      testing.TB
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
	log    string
}

// start starts the server on port and waits until it accepts connections.
func start(t testing.TB, cred *syscall.Credential, bin, dir, data, sock string, port int) (*server, error) {
	logPath := filepath.Join(dir, fmt.Sprintf("postgres-%d.log", port))
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := command(cred, bin, "-D", data, "-p", strconv.Itoa(port),
		"-c", "listen_addresses=127.0.0.1",
		"-c", "unix_socket_directories="+sock,
		"-c", "fsync=off",
		"-c", "synchronous_commit=off",
		"-c", "full_page_writes=off",
		"-c", "shared_buffers=32MB",
		"-c", "dynamic_shared_memory_type=mmap")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	s := &server{t: t, cmd: cmd, exited: make(chan struct{}), log: logPath}
	go func() {
		cmd.Wait()
		close(s.exited)
	}()
	url := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable&connect_timeout=5", port)
	deadline := time.NewTimer(60 * time.Second)
	defer deadline.Stop()
	retry := time.NewTicker(25 * time.Millisecond)
	defer retry.Stop()
	for {
		if err := ping(url); err == nil {
			return s, nil
		}
		select {
		case <-s.exited:
			return nil, fmt.Errorf("postgres exited before accepting connections: %s\n%s", cmd.ProcessState, s.tail())
		case <-deadline.C:
			s.stop()
			return nil, fmt.Errorf("postgres did not accept connections within 60s:\n%s", s.tail())
		case <-retry.C:
		}
	}
}

func ping(url string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	return errors.Join(conn.Ping(ctx), conn.Close(ctx))
}

// stop asks for a fast shutdown (SIGINT), waits for the server to exit, and
// kills it if it has not within 30s.
func (s *server) stop() {
	select {
	case <-s.exited:
		return
	default:
	}
	s.cmd.Process.Signal(syscall.SIGINT)
	timer := time.NewTimer(30 * time.Second)
	defer timer.Stop()
	select {
	case <-s.exited:
	case <-timer.C:
		s.t.Logf("pgtest: postgres did not stop within 30s; killing it")
		s.cmd.Process.Kill()
		<-s.exited
	}
}

// tail returns the end of the server's log.
func (s *server) tail() string {
	b, _ := os.ReadFile(s.log)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-20):], "\n")
}
