package telemetry

import (
	"sync"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// optKey names one combination of metric attributes. Its values are
// bounded (allowed models, reason codes), so the cache stays small.
type optKey struct {
	metric  uint8
	a, b, c string
}

const (
	keyBatchSize uint8 = iota
	keyBatchWait
	keyEngineTime
	keyTokens
	keyTokenRate
	keyResults
	keySettled
	keyDeadLetters
	keyQueueTime
	keyRequestTime
	keyFirstToken
	keyLane
)

// optCache keeps built attribute sets: building one (sorting, hashing) is
// most of what recording a measurement costs.
type optCache struct {
	mu sync.RWMutex
	m  map[optKey]metric.MeasurementOption
}

// get returns the option for k, building it from attrs the first time.
// attrs is called only on a miss.
func (c *optCache) get(k optKey, attrs func() []attribute.KeyValue) metric.MeasurementOption {
	c.mu.RLock()
	opt, ok := c.m[k]
	c.mu.RUnlock()
	if ok {
		return opt
	}
	opt = metric.WithAttributeSet(attribute.NewSet(attrs()...))
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[optKey]metric.MeasurementOption{}
	}
	c.m[k] = opt
	return opt
}
