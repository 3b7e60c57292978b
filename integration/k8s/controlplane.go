package k8s

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"

	"github.com/sous-run/sous/integration/itest"
)

// kube-controller-manager's names for the controllers the tests run.
const (
	DeploymentController = "deployment-controller"
	ReplicaSetController = "replicaset-controller"
	// HPAController is the HorizontalPodAutoscaler controller; it reads
	// KEDA's metric from external.metrics.k8s.io, every 15 s (its default
	// --horizontal-pod-autoscaler-sync-period, kept).
	HPAController = "horizontal-pod-autoscaler-controller"
)

// frontProxyClient is the common name of the apiserver's client
// certificate for aggregated APIs (--requestheader-allowed-names).
const frontProxyClient = "front-proxy-client"

// ControlPlane is etcd, kube-apiserver and kube-controller-manager on
// loopback ports of their own, with an admin token (system:masters). Its
// fields are set by Start and read-only afterwards.
type ControlPlane struct {
	// Dir holds the certificates, the kubeconfig and each process's log.
	Dir string
	// Kubeconfig is a kubeconfig file for the admin token.
	Kubeconfig string
	// Config reaches the apiserver as the admin.
	Config  *rest.Config
	Client  kubernetes.Interface
	Dynamic dynamic.Interface

	bins Binaries
	ca   *authority
	// keda is set by StartKEDA: what the metrics adapter needs to reach
	// the operator.
	keda struct {
		certDir  string // ca.crt, tls.crt, tls.key (the operator's and the adapter's)
		grpcAddr string // the operator's metrics service (gRPC, mutual TLS)
	}
	mapper *restmapper.DeferredDiscoveryRESTMapper
	procs  []*process
	// hasScheduler is set by the first StartNode, which runs kube-scheduler
	// for every node.
	hasScheduler bool
}

// Options choose what the control plane runs.
type Options struct {
	// Controllers are kube-controller-manager's --controllers; the default
	// is the Deployment and ReplicaSet controllers, which is what turns a
	// Deployment's replicas into Pod objects. Add HPAController for the
	// HorizontalPodAutoscaler (KEDA's 1 <-> N).
	Controllers []string
}

// Start runs the control plane for t and stops it when t ends. It fails t
// with the log of whichever process did not come up.
func Start(t testing.TB, b Binaries, o Options) *ControlPlane {
	t.Helper()
	if len(o.Controllers) == 0 {
		o.Controllers = []string{DeploymentController, ReplicaSetController}
	}
	c := &ControlPlane{Dir: t.TempDir(), bins: b}
	t.Cleanup(c.stop)
	if err := c.start(t, o); err != nil {
		c.stop()
		t.Fatalf("k8s: %v", err)
	}
	return c
}

func (c *ControlPlane) start(t testing.TB, o Options) error {
	began := time.Now()
	ca, err := newAuthority()
	if err != nil {
		return err
	}
	c.ca = ca
	caFile := filepath.Join(c.Dir, "ca.crt")
	if err := os.WriteFile(caFile, ca.certPEM, 0o600); err != nil {
		return err
	}
	apiCert, apiKey, err := ca.serving(c.Dir, "apiserver", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
	if err != nil {
		return err
	}
	// The aggregation layer: the apiserver proxies an APIService's
	// requests with a client certificate of a CA of its own (the front
	// proxy's), the user in X-Remote-* headers, and an aggregated server
	// (KEDA's metrics adapter) trusts those headers only from that CA and
	// that name, which it reads from kube-system's
	// extension-apiserver-authentication ConfigMap.
	frontProxy, err := newAuthority()
	if err != nil {
		return err
	}
	frontProxyCA := filepath.Join(c.Dir, "front-proxy-ca.crt")
	if err := os.WriteFile(frontProxyCA, frontProxy.certPEM, 0o600); err != nil {
		return err
	}
	proxyCert, proxyKey, err := frontProxy.serving(c.Dir, frontProxyClient)
	if err != nil {
		return err
	}
	saPriv, saPub, err := signingKey(c.Dir)
	if err != nil {
		return err
	}
	token, err := randomToken()
	if err != nil {
		return err
	}
	tokenFile := filepath.Join(c.Dir, "tokens.csv")
	if err := os.WriteFile(tokenFile, []byte(token+`,admin,admin,"system:masters"`+"\n"), 0o600); err != nil {
		return err
	}

	etcdClient := "http://" + itest.FreeAddr(t)
	etcdPeer := "http://" + itest.FreeAddr(t)
	etcd, err := startProcess(c.Dir, "etcd", c.bins.Etcd, nil,
		"-data-dir", filepath.Join(c.Dir, "etcd"),
		"-listen-client-urls", etcdClient,
		"-listen-peer-urls", etcdPeer)
	if err != nil {
		return err
	}
	c.procs = append(c.procs, etcd)

	apiPort := itest.FreePort(t)
	api, err := startProcess(c.Dir, "kube-apiserver", c.bins.APIServer, nil,
		"--etcd-servers="+etcdClient,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(apiPort),
		"--cert-dir="+filepath.Join(c.Dir, "apiserver-certs"),
		"--tls-cert-file="+apiCert,
		"--tls-private-key-file="+apiKey,
		"--client-ca-file="+caFile,
		"--token-auth-file="+tokenFile,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+saPub,
		"--service-account-signing-key-file="+saPriv,
		"--service-cluster-ip-range=10.0.0.0/24",
		"--requestheader-client-ca-file="+frontProxyCA,
		"--requestheader-allowed-names="+frontProxyClient,
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file="+proxyCert,
		"--proxy-client-key-file="+proxyKey,
		// No kubelet, no Service traffic: the kubernetes Service's
		// endpoints would point at a loopback address nothing can use.
		"--endpoint-reconciler-type=none",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
	)
	if err != nil {
		return err
	}
	c.procs = append(c.procs, api)

	c.Config = &rest.Config{
		Host:            "https://127.0.0.1:" + strconv.Itoa(apiPort),
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: ca.certPEM},
		QPS:             200,
		Burst:           400,
	}
	if c.Client, err = kubernetes.NewForConfig(c.Config); err != nil {
		return err
	}
	if c.Dynamic, err = dynamic.NewForConfig(c.Config); err != nil {
		return err
	}
	c.mapper = restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(c.Client.Discovery()))
	c.Kubeconfig = filepath.Join(c.Dir, "kubeconfig")
	if err := os.WriteFile(c.Kubeconfig, kubeconfig(c.Config.Host, ca.certPEM, token), 0o600); err != nil {
		return err
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := c.waitFor(ctx, api, func(ctx context.Context) error {
		_, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	}); err != nil {
		return fmt.Errorf("kube-apiserver not ready: %w\n--- etcd log ---\n%s\n--- kube-apiserver log ---\n%s", err, etcd.tail(20), api.tail(40))
	}
	t.Logf("k8s: etcd and kube-apiserver ready on %s in %s", c.Config.Host, time.Since(began).Round(100*time.Millisecond))

	kcmStart := time.Now()
	kcmCert, kcmKey, err := ca.serving(c.Dir, "controller-manager")
	if err != nil {
		return err
	}
	kcmPort := itest.FreePort(t)
	kcm, err := startProcess(c.Dir, "kube-controller-manager", c.bins.ControllerManager, nil,
		"--kubeconfig="+c.Kubeconfig,
		"--authentication-kubeconfig="+c.Kubeconfig,
		"--authorization-kubeconfig="+c.Kubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(kcmPort),
		"--tls-cert-file="+kcmCert,
		"--tls-private-key-file="+kcmKey,
		"--controllers="+strings.Join(o.Controllers, ","),
		"--use-service-account-credentials=false",
		"--profiling=false",
	)
	if err != nil {
		return err
	}
	c.procs = append(c.procs, kcm)
	if err := c.waitFor(ctx, kcm, httpsOK(ca, "https://127.0.0.1:"+strconv.Itoa(kcmPort)+"/healthz")); err != nil {
		return fmt.Errorf("kube-controller-manager not healthy: %w\n--- log ---\n%s", err, kcm.tail(40))
	}
	t.Logf("k8s: kube-controller-manager (%s) healthy in %s", strings.Join(o.Controllers, ","), time.Since(kcmStart).Round(100*time.Millisecond))
	return nil
}

// waitFor polls ready until it succeeds, ctx ends or p exits.
func (c *ControlPlane) waitFor(ctx context.Context, p *process, ready func(context.Context) error) error {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if done, err := p.exited(); done {
			return fmt.Errorf("%s exited: %v", p.name, err)
		}
		callCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
		last = ready(callCtx)
		cancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last: %v)", p.name, ctx.Err(), last)
		case <-tick.C:
		}
	}
}

// stop stops every process, last started first, and waits for each.
func (c *ControlPlane) stop() {
	for i := len(c.procs) - 1; i >= 0; i-- {
		c.procs[i].stop(10 * time.Second)
	}
	c.procs = nil
}

// LogLines returns the lines of process name's log that contain substr.
func (c *ControlPlane) LogLines(name, substr string) []string {
	b, err := os.ReadFile(filepath.Join(c.Dir, name+".log"))
	if err != nil {
		return []string{err.Error()}
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return out
}

// Logs returns the tail of each process's log, for a failing test.
func (c *ControlPlane) Logs(lines int) string {
	var b strings.Builder
	for _, p := range c.procs {
		fmt.Fprintf(&b, "--- %s (%s) ---\n%s\n", p.name, p.log, p.tail(lines))
	}
	return b.String()
}

func httpsOK(ca *authority, url string) func(context.Context) error {
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	return func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		return nil
	}
}

func randomToken() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

func kubeconfig(server string, caPEM []byte, token string) []byte {
	return []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    token: %s
contexts:
- name: test
  context:
    cluster: test
    user: admin
current-context: test
`, server, base64.StdEncoding.EncodeToString(caPEM), token))
}
