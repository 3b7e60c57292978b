package wire

import (
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strconv"
)

type optKind int

const (
	optInt optKind = iota + 1
	optFloat
	optBool
	optStrings
)

type optSpec struct {
	kind     optKind
	min, max float64
}

// knownOptions are the engine options a request may set, with their types
// and sane ranges. They follow Ollama's option names; the OpenAI engine maps
// the ones it understands. Anything else is rejected, so a typo is a clear
// error rather than a silently ignored knob.
var knownOptions = map[string]optSpec{
	"temperature":       {optFloat, 0, 100},
	"top_p":             {optFloat, 0, 1},
	"min_p":             {optFloat, 0, 1},
	"typical_p":         {optFloat, 0, 1},
	"top_k":             {optInt, 0, 1 << 20},
	"seed":              {optInt, math.MinInt32, math.MaxInt32},
	"num_predict":       {optInt, 1, math.MaxInt32},
	"num_ctx":           {optInt, 1, 1 << 22},
	"num_keep":          {optInt, 0, 1 << 22},
	"repeat_last_n":     {optInt, -1, 1 << 22},
	"repeat_penalty":    {optFloat, 0, 100},
	"presence_penalty":  {optFloat, -100, 100},
	"frequency_penalty": {optFloat, -100, 100},
	"mirostat":          {optInt, 0, 2},
	"mirostat_tau":      {optFloat, 0, 100},
	"mirostat_eta":      {optFloat, 0, 100},
	"penalize_newline":  {optBool, 0, 0},
	"stop":              {optStrings, 0, 16},
}

// checkOptions type-checks options and returns them with JSON numbers turned
// into int64 or float64. num_predict is capped at lim.MaxNumPredict, with a
// note saying so for the result, and defaults to it, so no request can
// generate without bound.
func checkOptions(in map[string]any, lim Limits) (map[string]any, []string, *InputError) {
	out := make(map[string]any, len(in)+1)
	names := make([]string, 0, len(in))
	for k := range in {
		names = append(names, k)
	}
	sort.Strings(names) // deterministic error for deterministic input
	for _, name := range names {
		spec, ok := knownOptions[name]
		if !ok {
			return nil, nil, inputErr(ReasonInvalidOption, "unknown option %q; see docs/messages.md for the options sous accepts", truncate(name, 64))
		}
		v, err := convertOption(name, spec, in[name])
		if err != nil {
			return nil, nil, err
		}
		out[name] = v
	}
	var notes []string
	if lim.MaxNumPredict > 0 {
		if n, ok := out["num_predict"].(int64); ok && n > int64(lim.MaxNumPredict) {
			out["num_predict"] = int64(lim.MaxNumPredict)
			notes = append(notes, NumPredictCapped(n, lim.MaxNumPredict))
		}
		if _, ok := out["num_predict"]; !ok {
			out["num_predict"] = int64(lim.MaxNumPredict)
		}
	}
	return out, notes, nil
}

// NumPredictCapped is the result note of a request whose num_predict was
// above the worker's limit.
func NumPredictCapped(asked int64, limit int) string {
	return fmt.Sprintf("num_predict %d capped at %d (SOUS_MAX_NUM_PREDICT)", asked, limit)
}

// number prints a bound the way a person writes it: 2147483647, not
// 2.147483647e+09.
func number(f float64) string { return strconv.FormatFloat(f, 'f', -1, 64) }

func convertOption(name string, spec optSpec, v any) (any, *InputError) {
	switch spec.kind {
	case optInt, optFloat:
		num, ok := v.(json.Number)
		if !ok {
			return nil, inputErr(ReasonInvalidOption, "option %q must be a number", name)
		}
		f, err := num.Float64()
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			return nil, inputErr(ReasonInvalidOption, "option %q must be a finite number", name)
		}
		if f < spec.min || f > spec.max {
			return nil, inputErr(ReasonInvalidOption, "option %q must be between %s and %s, got %s", name, number(spec.min), number(spec.max), truncate(num.String(), 32))
		}
		if spec.kind == optFloat {
			return f, nil
		}
		if f != math.Trunc(f) {
			return nil, inputErr(ReasonInvalidOption, "option %q must be an integer", name)
		}
		return int64(f), nil
	case optBool:
		b, ok := v.(bool)
		if !ok {
			return nil, inputErr(ReasonInvalidOption, "option %q must be true or false", name)
		}
		return b, nil
	case optStrings:
		list, ok := v.([]any)
		if !ok {
			return nil, inputErr(ReasonInvalidOption, "option %q must be a list of strings", name)
		}
		if len(list) > int(spec.max) {
			return nil, inputErr(ReasonInvalidOption, "option %q has %d entries, at most %d are allowed", name, len(list), int(spec.max))
		}
		out := make([]string, 0, len(list))
		for _, e := range list {
			s, ok := e.(string)
			if !ok || s == "" || len(s) > 256 {
				return nil, inputErr(ReasonInvalidOption, "option %q must be a list of non-empty strings of at most 256 bytes", name)
			}
			out = append(out, s)
		}
		return out, nil
	}
	return nil, inputErr(ReasonInvalidOption, "option %q is not supported", name)
}
