package reliability

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// A private RabbitMQ node, for tests that stop, kill or reconfigure a
// broker: the shared one on 5672 is never touched. Each node has its own
// name (sous-test-<pid>-<n>@localhost), AMQP and distribution ports, data
// and log directories, config files and Erlang cookie, all under a
// temporary directory. It runs as a child of the test in its own process
// group (killed with the test binary if it dies: Pdeathsig) and is stopped
// with `rabbitmqctl -n <node> stop` at cleanup, SIGKILLed if that fails.
// Only loopback addresses: AMQP, the distribution port and epmd.
//
// Cost on 2 cores: about 7 s to boot a fresh node, 0.5 s to stop it; the
// tests log each boot as a FIGURE.

// nodeOptions configure a private node.
type nodeOptions struct {
	// tls, when set, makes the node listen with TLS only, verifying client
	// certificates against tls.caFile when requireClientCert is set.
	tls               *pki
	requireClientCert bool
	// conf adds rabbitmq.conf lines (e.g. "consumer_timeout = 4000").
	conf []string
	// advanced is the body of advanced.config's rabbit section, e.g.
	// "{channel_tick_interval, 500}".
	advanced []string
}

type rabbitNode struct {
	t        testing.TB
	name     string
	dir      string
	port     int
	distPort int
	env      []string
	tls      bool

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

var (
	nodesMu sync.Mutex
	nodes   []*rabbitNode
)

// rabbitScripts finds rabbitmq-server and rabbitmqctl. Debian's /usr/sbin
// wrappers switch to the rabbitmq user, which cannot write the test's
// temporary directory; the scripts they wrap run as the caller.
func rabbitScripts() (server, ctl string, err error) {
	for _, dir := range []string{os.Getenv("SOUS_RABBITMQ_SCRIPTS"), "/usr/lib/rabbitmq/bin"} {
		if dir == "" {
			continue
		}
		s, c := filepath.Join(dir, "rabbitmq-server"), filepath.Join(dir, "rabbitmqctl")
		if _, err := os.Stat(s); err == nil {
			return s, c, nil
		}
	}
	s, err := exec.LookPath("rabbitmq-server")
	if err != nil {
		return "", "", errors.New("rabbitmq-server is not installed (Debian/Ubuntu: apt-get install rabbitmq-server; or set SOUS_RABBITMQ_SCRIPTS to the directory of rabbitmq-server and rabbitmqctl)")
	}
	if real, err := filepath.EvalSymlinks(s); err == nil && filepath.Base(real) == "rabbitmq-script-wrapper" {
		s = filepath.Join(filepath.Dir(real), "rabbitmq-server")
	}
	return s, filepath.Join(filepath.Dir(s), "rabbitmqctl"), nil
}

// startNode boots a private node and registers its cleanup.
func startNode(t testing.TB, o nodeOptions) *rabbitNode {
	t.Helper()
	dir := t.TempDir()
	n := &rabbitNode{
		t:        t,
		name:     fmt.Sprintf("sous-test-%d-%d@localhost", os.Getpid(), seq.Add(1)),
		dir:      dir,
		port:     freePort(t),
		distPort: freePort(t),
		tls:      o.tls != nil,
	}
	cookie := make([]byte, 20)
	_, _ = rand.Read(cookie)
	must(t, os.WriteFile(filepath.Join(dir, ".erlang.cookie"), []byte(strings.ToUpper(hex.EncodeToString(cookie))), 0o400))
	conf := []string{
		"loopback_users = none",
		"log.console = false",
		"log.file.level = info",
	}
	if o.tls == nil {
		conf = append(conf, fmt.Sprintf("listeners.tcp.default = 127.0.0.1:%d", n.port))
	} else {
		conf = append(conf,
			"listeners.tcp = none",
			fmt.Sprintf("listeners.ssl.default = 127.0.0.1:%d", n.port),
			"ssl_options.cacertfile = "+o.tls.caFile,
			"ssl_options.certfile = "+o.tls.serverCert,
			"ssl_options.keyfile = "+o.tls.serverKey,
			"ssl_options.verify = verify_peer",
			fmt.Sprintf("ssl_options.fail_if_no_peer_cert = %t", o.requireClientCert),
		)
	}
	conf = append(conf, o.conf...)
	must(t, os.WriteFile(filepath.Join(dir, "rabbitmq.conf"), []byte(strings.Join(conf, "\n")+"\n"), 0o600))
	must(t, os.WriteFile(filepath.Join(dir, "advanced.config"), []byte("[{rabbit, ["+strings.Join(o.advanced, ", ")+"]}].\n"), 0o600))
	must(t, os.WriteFile(filepath.Join(dir, "enabled_plugins"), []byte("[].\n"), 0o600))
	must(t, os.WriteFile(filepath.Join(dir, "rabbitmq-env.conf"), nil, 0o600))
	n.env = append(os.Environ(),
		"HOME="+dir,
		"RABBITMQ_NODENAME="+n.name,
		"RABBITMQ_DIST_PORT="+strconv.Itoa(n.distPort),
		"RABBITMQ_MNESIA_BASE="+filepath.Join(dir, "mnesia"),
		"RABBITMQ_LOG_BASE="+filepath.Join(dir, "log"),
		"RABBITMQ_CONFIG_FILE="+filepath.Join(dir, "rabbitmq"),
		"RABBITMQ_ADVANCED_CONFIG_FILE="+filepath.Join(dir, "advanced.config"),
		"RABBITMQ_ENABLED_PLUGINS_FILE="+filepath.Join(dir, "enabled_plugins"),
		"RABBITMQ_CONF_ENV_FILE="+filepath.Join(dir, "rabbitmq-env.conf"),
		"RABBITMQ_PID_FILE="+filepath.Join(dir, "node.pid"),
		"ERL_EPMD_ADDRESS=127.0.0.1",
		"ERL_FLAGS=-kernel inet_dist_use_interface {127,0,0,1}",
	)
	if o.tls == nil {
		n.env = append(n.env, "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1", "RABBITMQ_NODE_PORT="+strconv.Itoa(n.port))
	}
	nodesMu.Lock()
	nodes = append(nodes, n)
	nodesMu.Unlock()
	t.Cleanup(func() {
		if err := n.stop(); err != nil {
			t.Logf("stop node %s: %v", n.name, err)
		}
		if t.Failed() {
			t.Logf("node %s log (last 30 lines):\n%s", n.name, tail(n.log(), 30))
		}
	})
	took, err := n.start()
	if err != nil {
		t.Fatal(err)
	}
	figure(t, "node_boot_s", fmt.Sprintf("%.1f", took.Seconds()))
	return n
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// URL is the node's AMQP URL for the guest user.
func (n *rabbitNode) URL() string {
	scheme := "amqp"
	if n.tls {
		scheme = "amqps"
	}
	return fmt.Sprintf("%s://guest:guest@127.0.0.1:%d/", scheme, n.port)
}

func (n *rabbitNode) addr() string { return fmt.Sprintf("127.0.0.1:%d", n.port) }

// start boots the node (again, with its data) and waits for its listener.
func (n *rabbitNode) start() (time.Duration, error) {
	server, _, err := rabbitScripts()
	if err != nil {
		return 0, err
	}
	out, err := os.OpenFile(filepath.Join(n.dir, "stdout.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return 0, err
	}
	defer out.Close()
	cmd := exec.Command(server)
	cmd.Dir = n.dir
	cmd.Env = n.env
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	began := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s: %w", server, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	n.mu.Lock()
	n.cmd, n.done = cmd, done
	n.mu.Unlock()
	deadline := time.Now().Add(90 * time.Second)
	for {
		select {
		case <-done:
			return 0, fmt.Errorf("node %s exited while booting:\n%s", n.name, tail(n.log(), 30))
		default:
		}
		if c, err := net.DialTimeout("tcp", n.addr(), time.Second); err == nil {
			c.Close()
			return time.Since(began), nil
		}
		if time.Now().After(deadline) {
			n.killLocked()
			return 0, fmt.Errorf("node %s did not listen on %s within 90s:\n%s", n.name, n.addr(), tail(n.log(), 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop stops the node gracefully (rabbitmqctl stop), SIGKILLing it if it is
// still there after 30s. Safe to call when it is not running.
func (n *rabbitNode) stop() error {
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	default:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := n.ctl(ctx, "stop")
	select {
	case <-done:
	case <-ctx.Done():
		n.killLocked()
		return fmt.Errorf("node did not stop within 30s (killed): %v", err)
	}
	return nil
}

// kill SIGKILLs the node's process group: a crash, not a shutdown.
func (n *rabbitNode) kill() { n.killLocked() }

func (n *rabbitNode) killLocked() {
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-done
}

// ctl runs rabbitmqctl against the node.
func (n *rabbitNode) ctl(ctx context.Context, args ...string) (string, error) {
	_, ctl, err := rabbitScripts()
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, ctl, append([]string{"-n", n.name}, args...)...)
	cmd.Env = n.env
	cmd.Dir = n.dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("rabbitmqctl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (n *rabbitNode) log() string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "log", n.name+".log"))
	s, _ := os.ReadFile(filepath.Join(n.dir, "stdout.log"))
	return string(s) + string(b)
}

// stopAllNodes kills any node a test left behind.
func stopAllNodes() {
	nodesMu.Lock()
	defer nodesMu.Unlock()
	for _, n := range nodes {
		n.killLocked()
	}
}
