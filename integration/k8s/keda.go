package k8s

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/sous-run/sous/integration/itest"
)

// KEDANamespace is where the operator keeps its own objects (leases,
// events, ClusterTriggerAuthentication secrets).
const KEDANamespace = "keda"

// ScaledObjects is the resource of KEDA's ScaledObject.
var ScaledObjects = schema.GroupVersionResource{Group: "keda.sh", Version: "v1alpha1", Resource: "scaledobjects"}

// StartKEDA installs KEDA's CRDs (server-side: one is larger than
// client-side apply's annotation allows) and runs the KEDA operator out of
// cluster against c, watching every namespace, until t ends. Only the
// operator: no admission webhooks, and no metrics apiserver, which 0 ↔ 1
// does not need (KEDA scales the Deployment itself between 0 and 1);
// StartKEDAAdapter adds it for 1 ↔ N.
func (c *ControlPlane) StartKEDA(t testing.TB) {
	t.Helper()
	if err := c.startKEDA(t); err != nil {
		t.Fatalf("k8s: KEDA: %v", err)
	}
}

func (c *ControlPlane) startKEDA(t testing.TB) error {
	began := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := c.ApplyDir(ctx, c.bins.KEDACRDs); err != nil {
		return fmt.Errorf("install CRDs: %w", err)
	}
	if err := c.WaitServed(ctx, ScaledObjects); err != nil {
		return err
	}
	_, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: KEDANamespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	// The operator's gRPC metrics service loads ca.crt, tls.crt and tls.key
	// from --cert-dir, even with nothing to serve it to.
	certDir := filepath.Join(c.Dir, "keda-certs")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		return err
	}
	// One certificate for the operator and the metrics adapter, as KEDA's
	// own chart shares one Secret: the operator serves gRPC with it and the
	// adapter presents it as its client certificate; the adapter also
	// serves external.metrics.k8s.io with it, under the name the
	// aggregator checks (<service>.<namespace>.svc).
	crt, key, err := c.ca.serving(certDir, "keda", "keda-operator", "keda-operator.keda.svc", adapterService+"."+KEDANamespace+".svc")
	if err != nil {
		return err
	}
	for from, to := range map[string]string{crt: "tls.crt", key: "tls.key"} {
		if err := os.Rename(from, filepath.Join(certDir, to)); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(certDir, "ca.crt"), c.ca.certPEM, 0o600); err != nil {
		return err
	}
	probe := itest.FreeAddr(t)
	grpcAddr := itest.FreeAddr(t)
	p, err := startProcess(c.Dir, "keda-operator", c.bins.KEDA,
		[]string{
			"KUBECONFIG=" + c.Kubeconfig,
			"WATCH_NAMESPACE=", // every namespace
			"POD_NAMESPACE=" + KEDANamespace,
			"KEDA_CLUSTER_OBJECT_NAMESPACE=" + KEDANamespace,
		},
		"--leader-elect=false",
		"--metrics-bind-address="+itest.FreeAddr(t),
		"--health-probe-bind-address="+probe,
		"--metrics-service-bind-address="+grpcAddr,
		"--cert-dir="+certDir,
		"--ca-dir="+certDir,
		"--enable-cert-rotation=false",
		"--zap-log-level=info",
		"--zap-encoder=console",
	)
	if err != nil {
		return err
	}
	c.procs = append(c.procs, p)
	if err := c.waitFor(ctx, p, httpOK("http://"+probe+"/readyz")); err != nil {
		return fmt.Errorf("operator not ready: %w\n--- log ---\n%s", err, p.tail(40))
	}
	c.keda.certDir, c.keda.grpcAddr = certDir, grpcAddr
	t.Logf("k8s: KEDA CRDs installed and the operator ready in %s", time.Since(began).Round(100*time.Millisecond))
	return nil
}

func httpOK(url string) func(context.Context) error {
	return func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET %s: %s", url, strconv.Itoa(resp.StatusCode))
		}
		return nil
	}
}
