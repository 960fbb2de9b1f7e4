// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title Multicall3 (aggregate3 subset): several calls in one transaction, each allowed to fail.
/// @notice The same `aggregate3` ABI as the canonical Multicall3 deployed on Base at
///         0xcA11bde05977b3631167028862bE2a173976CA11. tollgate deploys this on local chains; on
///         Base it uses the canonical one. Tests also use it as the "helper contract" an attacker
///         would use to spend several authorizations in one transaction.
contract Multicall3 {
    struct Call3 {
        address target;
        bool allowFailure;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    function aggregate3(Call3[] calldata calls) external payable returns (Result[] memory returnData) {
        uint256 length = calls.length;
        returnData = new Result[](length);
        for (uint256 i = 0; i < length; i++) {
            Call3 calldata call = calls[i];
            (bool success, bytes memory ret) = call.target.call(call.callData);
            require(success || call.allowFailure, "Multicall3: call failed");
            returnData[i] = Result(success, ret);
        }
    }
}
