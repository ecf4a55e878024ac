#!/usr/bin/env node
// Calls duet's DecodeService.Generate with nothing but proto/duet/v1/decode.proto.
//   node generate.js ADDRESS PROMPT
// Prints the generated text to stdout and the summary (JSON) to stderr; exits 1 on a gRPC error.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [address, prompt] = process.argv.slice(2);
if (!address || prompt === undefined) {
  console.error('usage: node generate.js ADDRESS PROMPT');
  process.exit(2);
}

const protoDir = path.join(__dirname, '..', '..', 'proto');
const definition = protoLoader.loadSync('duet/v1/decode.proto', {
  includeDirs: [protoDir],
  keepCase: true,  // field names as in the .proto: max_tokens, generated_tokens, ...
  longs: String,   // uint64 fields (ttft_ns, ...) as decimal strings
  enums: String,   // finish_reason as "FINISH_REASON_LENGTH"
  defaults: true,
});
const duet = grpc.loadPackageDefinition(definition).duet.v1;
const client = new duet.DecodeService(address, grpc.credentials.createInsecure());

const call = client.Generate({
  prompt,
  sampling: {temperature: 0},  // greedy
  stopping: {max_tokens: 16, ignore_eos: true},
});
let text = '';
let summary = null;
let failed = false;
call.on('data', (msg) => {
  text += msg.text;
  if (msg.summary) summary = msg.summary;
});
call.on('error', (err) => {
  failed = true;
  console.error(`Generate failed: ${grpc.status[err.code]}: ${err.details}`);
  process.exitCode = 1;
  client.close();
});
call.on('end', () => {
  if (failed) return;
  process.stdout.write(text);
  console.error(JSON.stringify(summary));
  client.close();
});
