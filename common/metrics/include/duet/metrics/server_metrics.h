// The metric sets of the two servers, built on a Registry. Members are references into the
// registry (which owns them); the structs are cheap to pass by pointer. No gRPC here: callers
// give status codes as ints (gRPC's and absl's codes are the same numbers).
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>

#include <string>

#include "duet/metrics/metrics.h"

namespace duet::metrics {

struct DecodeMetrics {
  explicit DecodeMetrics(Registry& r);

  prometheus::Histogram& ttft;            // arrival -> first token written to the client
  prometheus::Histogram& inter_token;     // between consecutive tokens of one request
  prometheus::Histogram& e2e;             // arrival -> final message
  prometheus::Histogram& queue_time;      // ready to decode -> joined a batch
  prometheus::Histogram& kv_transfer;     // first -> last K/V message of a remote prefill
  prometheus::Histogram& batch_size;      // sequences in one engine step
  prometheus::Counter& kv_transfer_bytes;
  prometheus::Counter& prompt_tokens;     // tokens prefilled for requests (remote or local)
  prometheus::Counter& generation_tokens;
  prometheus::Counter& evictions;
  prometheus::Gauge& running;             // sequences in the engine's batch
  prometheus::Gauge& waiting;             // admitted, not yet in the batch (incl. prefilling)
  prometheus::Gauge& kv_cache_usage;      // used blocks / pool blocks
  prometheus::Gauge& sessions_prefilling;
  prometheus::Gauge& sessions_decoding;
  prometheus::Gauge& sessions_idle;

  // One request ended with this status (0 = OK, with `ok_reason` "stop" or "length").
  void Finished(int code, const char* ok_reason);

 private:
  prometheus::Family<prometheus::Counter>& finished_;
  prometheus::Family<prometheus::Counter>& errors_;
};

struct PrefillMetrics {
  explicit PrefillMetrics(Registry& r);

  prometheus::Histogram& compute;      // a job's forward pass and K/V encoding
  prometheus::Histogram& queue_time;   // arrival -> start of compute
  prometheus::Counter& tokens;         // prompt tokens prefilled
  prometheus::Gauge& running;          // jobs in the pass on the engine thread
  prometheus::Gauge& waiting;          // jobs queued

  // A Prefill call ended with a non-OK status.
  void Error(int code);

 private:
  prometheus::Family<prometheus::Counter>& errors_;
};

}  // namespace duet::metrics
