package k8s

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sous-run/sous/integration/itest"
)

// NodeEnv is the environment variable that turns the node tests off: a
// kube-scheduler, a kubelet and a private containerd beside the control
// plane (docs/design/kubelet.md). They run by default; they change the
// host while they run (cgroups, mounts, kernel tunables the kubelet sets,
// all restored afterwards), so SOUS_K8S_NODE=0 skips them, also under
// CI=true.
const NodeEnv = "SOUS_K8S_NODE"

// nodeLockFile serializes the node tests of every process on the host (two
// worktrees' `make test`, say): a node reads the kernel tunables before its
// kubelet sets them and writes them back afterwards, which only works when
// no other kubelet of this kind runs meanwhile.
const nodeLockFile = "/run/sous-k8s-node.lock"

// PauseImage is the sandbox image the node test builds (integration/k8s/pause)
// and containerd's sandbox_image: nothing can be pulled here.
const PauseImage = "docker.io/library/sous-pause:dev"

// NodeBinaries are the node's programs: kube-scheduler and the kubelet
// from .cache/k8s/bin (make k8s-node), and the host's containerd, its runc
// shim, runc and the CNI plugins (Debian's containerd, runc and
// containernetworking-plugins).
type NodeBinaries struct {
	Scheduler, Kubelet string
	Containerd, Ctr    string
	Runc, CNIDir       string
}

// NeedNode returns the node's programs. It skips t with SOUS_K8S_NODE=0.
// Where the node cannot run (not root; kube-scheduler or the kubelet not
// built: `make k8s`; containerd, runc or the CNI plugins not installed:
// scripts/ensure-node.sh; no Docker engine) it skips t with the reason,
// or fails t under CI=true: CI installs and builds all of it, so a
// missing part there is a broken setup, not a reason to skip.
func NeedNode(t testing.TB) NodeBinaries {
	t.Helper()
	if os.Getenv(NodeEnv) == "0" {
		t.Skipf("k8s: %s=0: the node tests (kubelet, kube-scheduler, a private containerd) are off", NodeEnv)
	}
	cannot := func(format string, args ...any) {
		t.Helper()
		msg := fmt.Sprintf(format, args...)
		if os.Getenv("CI") == "true" {
			t.Fatalf("k8s: CI=true and the node tests cannot run: %s", msg)
		}
		t.Skipf("k8s: the node tests cannot run: %s (%s=0 turns them off)", msg, NodeEnv)
	}
	if os.Geteuid() != 0 {
		cannot("the kubelet and containerd need root")
	}
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(root, ".cache", "k8s", "bin")
	nb := NodeBinaries{
		Scheduler:  filepath.Join(bin, "kube-scheduler"),
		Kubelet:    filepath.Join(bin, "kubelet"),
		Containerd: "/usr/bin/containerd",
		Ctr:        "/usr/bin/ctr",
		Runc:       "/usr/sbin/runc",
		CNIDir:     "/usr/lib/cni",
	}
	for _, p := range []string{nb.Scheduler, nb.Kubelet} {
		if _, err := os.Stat(p); err != nil {
			cannot("%s is missing: run `make k8s`", p)
		}
	}
	for _, p := range []string{nb.Containerd, nb.Ctr, nb.Runc, "/usr/bin/containerd-shim-runc-v2", filepath.Join(nb.CNIDir, "loopback")} {
		if _, err := os.Stat(p); err != nil {
			cannot("%s is missing: run scripts/ensure-node.sh (Debian's containerd, runc and containernetworking-plugins)", p)
		}
	}
	if _, err := exec.LookPath("docker"); err != nil {
		cannot("the node's images come from Docker: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "docker", "version", "--format", "{{.Server.Version}}").CombinedOutput(); err != nil {
		cannot("no Docker engine answers (scripts/ensure-docker.sh starts one): %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nb
}

// NodeLifecycleController is kube-controller-manager's controller that
// takes node.kubernetes.io/not-ready:NoSchedule off a node once it is
// Ready; the kubelet registers the node with that taint, so without this
// controller no pod is ever scheduled ("1 node(s) had untolerated
// taint(s)"). Add it to Options.Controllers for a node.
const NodeLifecycleController = "node-lifecycle-controller"

// The controllers a pod's service-account token needs: the "default"
// ServiceAccount of each namespace (admission refuses a pod without its
// ServiceAccount) and the kube-root-ca.crt ConfigMap the projected token
// volume mounts.
const (
	ServiceAccountController = "serviceaccount-controller"
	RootCAPublisher          = "root-ca-certificate-publisher-controller"
)

// NodeName is the name of the first node: the kubelet registers its node
// under its loopback address. The kubelet refuses --node-ip=127.0.0.1
// ("nodeIP can't be loopback address"), but takes a hostname override that
// parses as an IP as the node's InternalIP unchecked, so the node's
// address, and so every host-network pod's IP and probe target, is
// 127.0.0.1. Further nodes take other addresses of 127/8, all on lo.
const NodeName = "127.0.0.1"

// NodeOptions choose a node's name and what it can run.
type NodeOptions struct {
	// Name is the node's name and address, a loopback address; the
	// default is NodeName. Each node of a cluster needs its own.
	Name string
	// Images are loaded from the local Docker engine (docker save) besides
	// the pause image.
	Images []string
}

// Node is a kube-scheduler, a kubelet and the private containerd it runs
// pods with, all on loopback, their state under Dir. Pods must use host
// networking: the node has a loopback-only CNI network (see StartNode).
type Node struct {
	// Name is the node's name and its address (NodeOptions.Name).
	Name string
	// Dir holds the node's state (containerd's, the kubelet's); its
	// processes log into the control plane's Dir, which outlives it.
	Dir string
	// Socket is the private containerd's gRPC socket (CRI and ctr).
	Socket string

	c          *ControlPlane
	bins       NodeBinaries
	containerd *process
	scheduler  *process // only on the cluster's first node
	kubelet    *process
	// cgroupRoot is the kubelet's cgroupRoot, made for it in every
	// hierarchy: two kubelets under one /kubepods would remove each
	// other's pod cgroups as orphans.
	cgroupRoot string
	sysctls    map[string]string
}

// StartNode starts the private containerd, loads images (and the pause
// image, built here) into it from the local Docker engine, and starts the
// scheduler and the kubelet; it returns once the node is Ready and has no
// NoSchedule taint (c must run NodeLifecycleController). Everything
// is stopped, and the pods' containers and mounts removed, when t ends.
func (c *ControlPlane) StartNode(t testing.TB, nb NodeBinaries, o NodeOptions) *Node {
	t.Helper()
	if o.Name == "" {
		o.Name = NodeName
	}
	// A short path: containerd's socket must fit a sockaddr_un (108 bytes).
	dir, err := os.MkdirTemp("", "sous-node-")
	if err != nil {
		t.Fatal(err)
	}
	n := &Node{Name: o.Name, Dir: dir, Socket: filepath.Join(dir, "containerd.sock"), c: c, bins: nb,
		cgroupRoot: "/" + filepath.Base(dir)}
	if !c.hasScheduler {
		// The cluster's first node holds the host's lock until every
		// node of the cluster has stopped (cleanups run last first).
		lockHost(t)
	}
	t.Cleanup(n.stop)
	if err := n.start(t, o.Images); err != nil {
		t.Fatalf("k8s: node: %v\n%s", err, n.logs(40))
	}
	return n
}

// lockHost takes nodeLockFile until t ends, waiting while another
// process's node test holds it.
func lockHost(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile(nodeLockFile, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatalf("k8s: the node tests' host lock: %v", err)
	}
	t.Cleanup(func() { f.Close() }) // closing releases the lock
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err == nil {
		return
	}
	began := time.Now()
	t.Logf("k8s: another process's node test holds %s; waiting for it", nodeLockFile)
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatalf("k8s: the node tests' host lock: %v", err)
	}
	t.Logf("k8s: got %s after %s", nodeLockFile, time.Since(began).Round(100*time.Millisecond))
}

func (n *Node) start(t testing.TB, images []string) error {
	began := time.Now()
	if err := n.startContainerd(); err != nil {
		return err
	}
	t.Logf("k8s: containerd (private, CRI on %s) up in %s", n.Socket, time.Since(began).Round(100*time.Millisecond))

	loaded := time.Now()
	if err := buildPause(n.Dir); err != nil {
		return err
	}
	if err := n.importImages(append([]string{PauseImage}, images...)); err != nil {
		return err
	}
	t.Logf("k8s: images %v loaded into containerd in %s", append([]string{PauseImage}, images...), time.Since(loaded).Round(100*time.Millisecond))

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if !n.c.hasScheduler {
		if err := n.startScheduler(t, ctx); err != nil {
			return err
		}
		n.c.hasScheduler = true
	}

	kubeletStart := time.Now()
	sysctls, err := readSysctls()
	if err != nil {
		return err
	}
	n.sysctls = sysctls
	if err := makeCgroup(n.cgroupRoot); err != nil {
		return err
	}
	cfg, err := n.kubeletConfig(t)
	if err != nil {
		return err
	}
	kubelet, err := startProcess(n.c.Dir, "kubelet-"+n.Name, n.bins.Kubelet, nil,
		"--config="+cfg,
		"--kubeconfig="+n.c.Kubeconfig,
		"--root-dir="+filepath.Join(n.Dir, "kubelet"),
		"--cert-dir="+filepath.Join(n.Dir, "kubelet-pki"),
		"--hostname-override="+n.Name,
		"--v=2",
	)
	if err != nil {
		return err
	}
	n.kubelet = kubelet
	if err := n.c.waitFor(ctx, kubelet, func(ctx context.Context) error {
		node, err := n.c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		ready := false
		for _, cond := range node.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				if cond.Status != corev1.ConditionTrue {
					return fmt.Errorf("node %s not ready: %s: %s", n.Name, cond.Reason, cond.Message)
				}
				ready = true
			}
		}
		if !ready {
			return fmt.Errorf("node %s has no Ready condition yet", n.Name)
		}
		for _, taint := range node.Spec.Taints {
			if taint.Effect == corev1.TaintEffectNoSchedule || taint.Effect == corev1.TaintEffectNoExecute {
				return fmt.Errorf("node %s is Ready but tainted %s (is %s running?)", n.Name, taint.ToString(), NodeLifecycleController)
			}
		}
		return nil
	}); err != nil {
		return fmt.Errorf("kubelet: %w", err)
	}
	t.Logf("k8s: kubelet registered node %s, Ready and untainted in %s", n.Name, time.Since(kubeletStart).Round(100*time.Millisecond))
	return nil
}

// startScheduler runs kube-scheduler for the whole cluster, on the first
// node, and waits until it is healthy.
func (n *Node) startScheduler(t testing.TB, ctx context.Context) error {
	schedPort := itest.FreePort(t)
	schedCert, schedKey, err := n.c.ca.serving(n.Dir, "scheduler")
	if err != nil {
		return err
	}
	sched, err := startProcess(n.c.Dir, "kube-scheduler", n.bins.Scheduler, nil,
		"--kubeconfig="+n.c.Kubeconfig,
		"--authentication-kubeconfig="+n.c.Kubeconfig,
		"--authorization-kubeconfig="+n.c.Kubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(schedPort),
		"--tls-cert-file="+schedCert,
		"--tls-private-key-file="+schedKey,
		"--profiling=false",
	)
	if err != nil {
		return err
	}
	n.scheduler = sched
	if err := n.c.waitFor(ctx, sched, httpsOK(n.c.ca, "https://127.0.0.1:"+strconv.Itoa(schedPort)+"/healthz")); err != nil {
		return fmt.Errorf("kube-scheduler not healthy: %w", err)
	}
	t.Logf("k8s: kube-scheduler healthy")
	return nil
}

// startContainerd runs a containerd of its own (root, state, sockets and
// CNI config under n.Dir), never the host's or Docker's, with the CRI
// plugin on. Its only CNI network is the loopback plugin: pods use host
// networking, and the loopback config is what makes the CRI report
// NetworkReady, so the kubelet reports the node Ready.
// restrict_oom_score_adj: this host's root lacks CAP_SYS_RESOURCE, so runc
// cannot lower a process's oom_score_adj (the kubelet asks -998 for the
// sandbox: "failed to update /proc/self/oom_score_adj: Permission denied",
// seen by the kubelet as "can't get final child's PID from pipe: EOF");
// the option clamps it to containerd's own.
func (n *Node) startContainerd() error {
	cniConf := filepath.Join(n.Dir, "cni")
	if err := os.MkdirAll(cniConf, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(cniConf, "10-loopback.conflist"),
		[]byte(`{"cniVersion":"0.4.0","name":"sous-loopback","plugins":[{"type":"loopback"}]}`+"\n"), 0o644); err != nil {
		return err
	}
	conf := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[6]q
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = %[7]q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[8]q
    conf_dir = %[9]q
`, filepath.Join(n.Dir, "containerd-root"), filepath.Join(n.Dir, "containerd-state"), n.Socket, n.Socket+".ttrpc",
		filepath.Join(n.Dir, "containerd-opt"), PauseImage, n.bins.Runc, n.bins.CNIDir, cniConf)
	confFile := filepath.Join(n.Dir, "containerd.toml")
	if err := os.WriteFile(confFile, []byte(conf), 0o644); err != nil {
		return err
	}
	p, err := startProcess(n.c.Dir, "containerd-"+n.Name, n.bins.Containerd, nil, "--config", confFile)
	if err != nil {
		return err
	}
	n.containerd = p
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return n.c.waitFor(ctx, p, func(ctx context.Context) error {
		return exec.CommandContext(ctx, n.bins.Ctr, "-a", n.Socket, "version").Run()
	})
}

// buildPause builds integration/k8s/pause, static, into a scratch image
// tagged PauseImage in the local Docker engine.
func buildPause(dir string) error {
	root, err := RepoRoot()
	if err != nil {
		return err
	}
	ctxDir := filepath.Join(dir, "pause-image")
	if err := os.MkdirAll(ctxDir, 0o755); err != nil {
		return err
	}
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(ctxDir, "pause"), "./integration/k8s/pause")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build pause: %v\n%s", err, out)
	}
	if err := os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), []byte("FROM scratch\nCOPY pause /pause\nENTRYPOINT [\"/pause\"]\n"), 0o644); err != nil {
		return err
	}
	if out, err := exec.Command("docker", "build", "-q", "-t", PauseImage, ctxDir).CombinedOutput(); err != nil {
		return fmt.Errorf("docker build %s: %v\n%s", PauseImage, err, out)
	}
	return nil
}

// importImages copies images from the local Docker engine into the private
// containerd's k8s.io namespace, the one its CRI plugin serves.
func (n *Node) importImages(images []string) error {
	save := exec.Command("docker", append([]string{"save"}, images...)...)
	imp := exec.Command(n.bins.Ctr, "-a", n.Socket, "-n", "k8s.io", "images", "import", "-")
	pipe, err := save.StdoutPipe()
	if err != nil {
		return err
	}
	imp.Stdin = pipe
	var saveErr, impOut strings.Builder
	save.Stderr = &saveErr
	imp.Stdout, imp.Stderr = &impOut, &impOut
	if err := save.Start(); err != nil {
		return fmt.Errorf("docker save: %w", err)
	}
	if err := imp.Run(); err != nil {
		_ = save.Process.Kill()
		_ = save.Wait()
		return fmt.Errorf("ctr images import: %v\n%s", err, impOut.String())
	}
	if err := save.Wait(); err != nil {
		return fmt.Errorf("docker save %v: %v\n%s", images, err, saveErr.String())
	}
	return nil
}

// kubeletConfig writes the KubeletConfiguration and returns its path.
func (n *Node) kubeletConfig(t testing.TB) (string, error) {
	cert, key, err := n.c.ca.serving(n.Dir, "kubelet")
	if err != nil {
		return "", err
	}
	caFile := filepath.Join(n.c.Dir, "ca.crt")
	// Why each setting, in docs/design/kubelet.md:
	//   failCgroupV1: false: this host's cgroups are v1 (hybrid); 1.37
	//     refuses v1 by default.
	//   cgroupDriver: cgroupfs: no systemd here, and containerd 1.6 has no
	//     RuntimeConfig RPC to tell the kubelet its driver (1.37 falls back
	//     to this setting, with a log line).
	//   the kubelet's API on the node's own loopback address only,
	//     anonymous and AlwaysAllow: the apiserver has no kubelet client
	//     certificate here (logs, exec).
	//   cgroupRoot: the node's own (see Node.cgroupRoot).
	//   eviction and image GC thresholds off: a shared disk's usage must not
	//     taint the node or remove the pause image.
	//   makeIPTablesUtilChains: false: the host's iptables are not ours.
	conf := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %s
cgroupRoot: %s
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
tlsCertFile: %q
tlsPrivateKeyFile: %q
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
  x509:
    clientCAFile: %q
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: %q
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
podLogsDir: %q
resolvConf: ""
makeIPTablesUtilChains: false
registerNode: true
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%%"
  nodefs.inodesFree: "1%%"
  imagefs.available: "1%%"
serializeImagePulls: false
nodeStatusUpdateFrequency: 2s
syncFrequency: 5s
`, n.Name, n.cgroupRoot, itest.FreePort(t), itest.FreePort(t), cert, key, caFile, "unix://"+n.Socket, filepath.Join(n.Dir, "pod-logs"))
	path := filepath.Join(n.Dir, "kubelet.yaml")
	return path, os.WriteFile(path, []byte(conf), 0o644)
}

// The kernel tunables the kubelet sets on start (protectKernelDefaults
// false; true makes it refuse to start when they differ), restored when
// the node stops.
var kubeletSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
}

func readSysctls() (map[string]string, error) {
	m := make(map[string]string, len(kubeletSysctls))
	for _, k := range kubeletSysctls {
		b, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			return nil, err
		}
		m[k] = strings.TrimSpace(string(b))
	}
	return m, nil
}

// stop deletes the node's pods (and the Deployments and ReplicaSets that
// would replace them) while the kubelet runs (so it unmounts their volumes), stops the kubelet and the scheduler, removes whatever
// containers are left through containerd, stops containerd, unmounts what
// is still mounted under Dir, restores the kernel tunables and removes Dir.
// Safe to call twice.
func (n *Node) stop() {
	if n.c == nil {
		return
	}
	if n.c.Client != nil && n.kubelet != nil {
		if done, _ := n.kubelet.exited(); !done {
			n.deletePods()
		}
	}
	for _, p := range []*process{n.kubelet, n.scheduler} {
		if p != nil {
			p.stop(10 * time.Second)
		}
	}
	n.kubelet, n.scheduler = nil, nil
	if n.containerd != nil {
		n.removeContainers()
		n.containerd.stop(10 * time.Second)
		n.containerd = nil
	}
	unmountUnder(n.Dir)
	removeCgroup(n.cgroupRoot)
	for k, v := range n.sysctls {
		_ = os.WriteFile("/proc/sys/"+k, []byte(v), 0o644)
	}
	n.sysctls = nil
	_ = os.RemoveAll(n.Dir)
	n.c = nil
}

// deletePods deletes every Deployment and ReplicaSet (so no controller
// makes new pods), then every pod on the node, and waits, up to a minute,
// for the kubelet to finish them.
func (n *Node) deletePods() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if ds, err := n.c.Client.AppsV1().Deployments("").List(ctx, metav1.ListOptions{}); err == nil {
		for _, d := range ds.Items {
			_ = n.c.Client.AppsV1().Deployments(d.Namespace).Delete(ctx, d.Name, metav1.DeleteOptions{})
		}
	}
	if rs, err := n.c.Client.AppsV1().ReplicaSets("").List(ctx, metav1.ListOptions{}); err == nil {
		for _, r := range rs.Items {
			_ = n.c.Client.AppsV1().ReplicaSets(r.Namespace).Delete(ctx, r.Name, metav1.DeleteOptions{})
		}
	}
	sel := metav1.ListOptions{FieldSelector: "spec.nodeName=" + n.Name}
	pods, err := n.c.Client.CoreV1().Pods("").List(ctx, sel)
	if err != nil {
		return
	}
	for _, p := range pods.Items {
		_ = n.c.Client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{})
	}
	for ctx.Err() == nil {
		pods, err := n.c.Client.CoreV1().Pods("").List(ctx, sel)
		if err != nil || len(pods.Items) == 0 {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// removeContainers kills and deletes every task and container left in the
// k8s.io namespace: a container outlives containerd (its shim is its
// parent), so this is what stops a pod the kubelet did not.
func (n *Node) removeContainers() {
	ctr := func(args ...string) string {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, _ := exec.CommandContext(ctx, n.bins.Ctr, append([]string{"-a", n.Socket, "-n", "k8s.io"}, args...)...).Output()
		return string(out)
	}
	ids := strings.Fields(ctr("containers", "ls", "-q"))
	for _, id := range ids {
		ctr("tasks", "kill", "-s", "SIGKILL", id)
	}
	for _, id := range ids {
		ctr("tasks", "delete", "-f", id)
		ctr("containers", "delete", id)
	}
}

// unmountUnder lazily unmounts every mount point under dir, deepest first.
func unmountUnder(dir string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	var points []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 4 && (fields[4] == dir || strings.HasPrefix(fields[4], dir+"/")) {
			points = append(points, fields[4])
		}
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	for _, p := range points {
		_ = syscall.Unmount(p, syscall.MNT_DETACH)
	}
}

// cgroupHierarchies are the cgroup file systems mounted under
// /sys/fs/cgroup: each v1 controller's and the unified (v2) one.
func cgroupHierarchies() []string {
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*")
	var out []string
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "cgroup.procs")); err == nil {
			out = append(out, d)
		}
	}
	return out
}

// makeCgroup makes cgroup path in every hierarchy; in the cpuset one it
// copies the root's cpus and mems, without which no task may join.
func makeCgroup(path string) error {
	for _, h := range cgroupHierarchies() {
		dir := filepath.Join(h, path)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("cgroup %s: %w", dir, err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if b, err := os.ReadFile(filepath.Join(h, f)); err == nil {
				if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
					return fmt.Errorf("cgroup %s: %w", filepath.Join(dir, f), err)
				}
			}
		}
	}
	return nil
}

// removeCgroup removes cgroup path and everything below it, deepest
// first, in every hierarchy; a cgroup with a process in it stays.
func removeCgroup(path string) {
	for _, h := range cgroupHierarchies() {
		var dirs []string
		_ = filepath.WalkDir(filepath.Join(h, path), func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = syscall.Rmdir(dirs[i])
		}
	}
}

// logs is the tail of each of the node's logs, for a failing test.
func (n *Node) logs(lines int) string {
	var b strings.Builder
	for _, p := range []*process{n.containerd, n.scheduler, n.kubelet} {
		if p == nil {
			continue
		}
		fmt.Fprintf(&b, "--- %s (%s) ---\n%s\n", p.name, p.log, p.tail(lines))
	}
	return b.String()
}

// Logs returns the tail of the node's and the control plane's logs.
func (n *Node) Logs(lines int) string {
	if n.c == nil {
		return ""
	}
	return n.logs(lines) + n.c.Logs(lines)
}
